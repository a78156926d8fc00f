//! Crash safety of wrapped key versions (issue 14 item 8): `kms serve --dev`
//! (wrapped versions on) is SIGKILLed while several clients create keys,
//! rotate them and encrypt, at a different moment in each round. After
//! every kill, with the server down: the catalogue holds no pending
//! version, and the token (listed by another process, on its own PKCS#11
//! session) holds the root only: every version and both service keys are
//! wrapped blobs, so a crash can leave no orphan object. After every
//! restart: every acknowledged create and rotation is there, wrapped, and
//! every acknowledged ciphertext decrypts to its plaintext.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_tests::{DevServerProcess, dev_token_object_labels};
use tonic::transport::Channel;

const CLIENTS: usize = 4;
const ROUNDS: u64 = 5;

/// What the clients were told succeeded.
#[derive(Default)]
struct Acknowledged {
    /// Key id → the highest version a create or rotate acknowledged.
    versions: BTreeMap<String, u32>,
    /// (key id, plaintext, ciphertext blob).
    ciphertexts: Vec<(String, Vec<u8>, Vec<u8>)>,
}

/// One client: creates a key, then rotates it and encrypts under it in
/// turn, until a request fails (the kill).
async fn client(channel: Channel, round: u64, client: usize) -> Acknowledged {
    let mut keys = KeyManagementClient::new(channel.clone());
    let mut crypto = CryptoClient::new(channel);
    let mut acked = Acknowledged::default();
    let mut key: Option<String> = None;
    for step in 0u32.. {
        let Some(key_id) = key.clone().filter(|_| step % 6 != 0) else {
            // A new key every sixth step.
            match keys
                .create_key(pb::CreateKeyRequest {
                    description: format!("crash round {round} client {client}"),
                    ..Default::default()
                })
                .await
            {
                Ok(reply) => {
                    let id = reply.into_inner().key_metadata.expect("metadata").key_id;
                    acked.versions.insert(id.clone(), 1);
                    key = Some(id);
                    continue;
                }
                Err(_) => break,
            }
        };
        if step % 2 == 1 {
            match keys
                .rotate_key(pb::RotateKeyRequest {
                    key_id: key_id.clone(),
                })
                .await
            {
                Ok(reply) => {
                    let version = reply.into_inner().new_version.expect("new version").version;
                    acked.versions.insert(key_id, version);
                }
                Err(_) => break,
            }
        } else {
            let plaintext = format!("round {round} client {client} step {step}").into_bytes();
            match crypto
                .encrypt(pb::EncryptRequest {
                    key_id: key_id.clone(),
                    plaintext: plaintext.clone(),
                    encryption_context: Default::default(),
                })
                .await
            {
                Ok(reply) => {
                    acked
                        .ciphertexts
                        .push((key_id, plaintext, reply.into_inner().ciphertext_blob));
                }
                Err(_) => break,
            }
        }
    }
    acked
}

/// Checks, with the server stopped, that the catalogue holds no pending
/// version and the token holds the root only.
fn check_stopped(data: &std::path::Path, round: u64) {
    let storage =
        kms_storage::Storage::open(&data.join("db"), &kms_storage::StorageOptions::default())
            .expect("open the catalogue");
    let pending = storage
        .catalogue()
        .list_pending_versions()
        .expect("pending versions");
    assert!(
        pending.is_empty(),
        "round {round}: pending versions after the kill: {pending:?}"
    );
    drop(storage);
    assert_eq!(
        dev_token_object_labels(data),
        vec!["kms-root/1"],
        "round {round}: the token holds an object besides the root"
    );
}

async fn check_running(server: &DevServerProcess, acked: &Acknowledged, round: u64) {
    let channel = Channel::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut keys = KeyManagementClient::new(channel.clone());
    let mut crypto = CryptoClient::new(channel);
    for (key, &version) in &acked.versions {
        let versions = keys
            .list_key_versions(pb::ListKeyVersionsRequest {
                key_id: key.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("round {round}: acknowledged key {key} is gone: {e:?}"))
            .into_inner()
            .versions;
        for n in 1..=version {
            let found = versions
                .iter()
                .find(|v| v.version == n)
                .unwrap_or_else(|| panic!("round {round}: {key} lost acknowledged version {n}"));
            assert_eq!(
                found.protection,
                pb::KeyVersionProtection::Wrapped as i32,
                "round {round}: {key} v{n}"
            );
            assert_eq!(
                found.state,
                pb::KeyVersionState::Enabled as i32,
                "round {round}: {key} v{n}"
            );
        }
    }
    for (key, plaintext, blob) in &acked.ciphertexts {
        let opened = crypto
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: blob.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "round {round}: an acknowledged ciphertext of {key} no longer decrypts: {e:?}"
                )
            })
            .into_inner();
        assert_eq!(&opened.plaintext, plaintext, "round {round}");
    }
}

#[tokio::test]
async fn sigkill_while_creating_and_rotating_wrapped_keys_leaves_nothing_behind() {
    let data = tempfile::tempdir().expect("data dir");
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    eprintln!("wrapped crash test seed {seed}");
    let mut acked = Acknowledged::default();
    let mut rotations_and_creates = 0usize;
    for round in 0..ROUNDS {
        let server = DevServerProcess::start(data.path());
        check_running(&server, &acked, round).await;
        let channel = Channel::from_shared(server.endpoint())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|c| tokio::spawn(client(channel.clone(), round, c)))
            .collect();
        // Kill points spread over the rounds (from during the first
        // creates to deep into the load), shifted by the seed.
        let kill_after = 80 + (u64::from(seed) + round * 173) % 120 + round * 90;
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        server.kill();
        for task in tasks {
            let done = tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("clients stop after the kill")
                .expect("client task");
            rotations_and_creates += done.versions.values().map(|&v| v as usize).sum::<usize>();
            for (key, version) in done.versions {
                let entry = acked.versions.entry(key).or_insert(0);
                *entry = (*entry).max(version);
            }
            acked.ciphertexts.extend(done.ciphertexts);
        }
        check_stopped(data.path(), round);
        eprintln!(
            "round {round}: killed after {kill_after} ms; {} keys, {} ciphertexts acknowledged so far",
            acked.versions.len(),
            acked.ciphertexts.len()
        );
    }
    let server = DevServerProcess::start(data.path());
    check_running(&server, &acked, ROUNDS).await;
    drop(server);
    assert!(
        rotations_and_creates >= 20 && acked.ciphertexts.len() >= 10,
        "too little load to mean anything: {rotations_and_creates} versions, {} ciphertexts",
        acked.ciphertexts.len()
    );
}
