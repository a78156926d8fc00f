//! Cluster backup and restore (issue 15 item 4, design note
//! `hierarchy-and-cluster.md` §1.6), end to end with three real etcd
//! members and three `kms` node processes: `kms backup create --cluster`
//! under load, then more work (rotations, a new key, a key deleted once its
//! waiting period is over), everything stopped, etcd restored from the
//! backup's snapshot into new members (`scripts/etcd-snapshot-restore.sh`),
//! `kms backup restore --cluster`, the nodes started again.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kms::config::Config;
use kms::service::KmsService;
use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_tests::cluster::{EtcdCluster, KMS_PREFIX};
use kms_tests::cluster_nodes::ClusterNodes;
use kms_tests::{kms_binary, run_cli};

/// Δ (`staleness_bound_ms`) of every node.
const DELTA: Duration = Duration::from_secs(2);

/// An acknowledged encryption: under which key, the blob, its plaintext.
#[derive(Debug, Clone)]
struct Acked {
    key: String,
    blob: Vec<u8>,
    plaintext: Vec<u8>,
}

async fn create_key(nodes: &ClusterNodes, node: usize) -> String {
    KeyManagementClient::new(nodes.channel(node))
        .create_key(pb::CreateKeyRequest::default())
        .await
        .expect("CreateKey")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id
}

async fn encrypt(nodes: &ClusterNodes, node: usize, key: &str, plaintext: &[u8]) -> Acked {
    let blob = CryptoClient::new(nodes.channel(node))
        .encrypt(pb::EncryptRequest {
            key_id: key.to_owned(),
            plaintext: plaintext.to_vec(),
            ..Default::default()
        })
        .await
        .expect("Encrypt")
        .into_inner()
        .ciphertext_blob;
    Acked {
        key: key.to_owned(),
        blob,
        plaintext: plaintext.to_vec(),
    }
}

async fn rotate(nodes: &ClusterNodes, node: usize, key: &str) {
    KeyManagementClient::new(nodes.channel(node))
        .rotate_key(pb::RotateKeyRequest {
            key_id: key.to_owned(),
        })
        .await
        .expect("RotateKey");
}

async fn versions(nodes: &ClusterNodes, node: usize, key: &str) -> Vec<pb::KeyVersion> {
    KeyManagementClient::new(nodes.channel(node))
        .list_key_versions(pb::ListKeyVersionsRequest {
            key_id: key.to_owned(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .expect("ListKeyVersions")
        .into_inner()
        .versions
}

async fn describe(nodes: &ClusterNodes, node: usize, key: &str) -> pb::KeyMetadata {
    KeyManagementClient::new(nodes.channel(node))
        .describe_key(pb::DescribeKeyRequest {
            key_id: key.to_owned(),
        })
        .await
        .expect("DescribeKey")
        .into_inner()
        .key_metadata
        .expect("metadata")
}

/// Three clients, client `c` on node `c`, encrypting under every key in
/// turn and rotating now and then, until `stop`.
fn start_load(
    nodes: &ClusterNodes,
    keys: &[String],
    acked: &Arc<Mutex<Vec<Acked>>>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..nodes.len())
        .map(|client| {
            let channel = nodes.channel(client);
            let keys = keys.to_vec();
            let acked = Arc::clone(acked);
            let stop = Arc::clone(stop);
            tokio::spawn(async move {
                let mut n = 0usize;
                while !stop.load(Ordering::Acquire) {
                    let key = &keys[(client + n) % keys.len()];
                    let plaintext = format!("node {client} message {n}").into_bytes();
                    let reply = CryptoClient::new(channel.clone())
                        .encrypt(pb::EncryptRequest {
                            key_id: key.clone(),
                            plaintext: plaintext.clone(),
                            ..Default::default()
                        })
                        .await
                        .expect("Encrypt under load");
                    acked.lock().expect("lock").push(Acked {
                        key: key.clone(),
                        blob: reply.into_inner().ciphertext_blob,
                        plaintext,
                    });
                    if n % 7 == 3 {
                        KeyManagementClient::new(channel.clone())
                            .rotate_key(pb::RotateKeyRequest {
                                key_id: key.clone(),
                            })
                            .await
                            .expect("RotateKey under load");
                    }
                    n += 1;
                }
            })
        })
        .collect()
}

async fn wait_for_acks(acked: &Arc<Mutex<Vec<Acked>>>, at_least: usize) {
    for _ in 0..6000 {
        if acked.lock().expect("lock").len() >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the load made no progress");
}

/// Finishes the deletion of every key pending deletion as node `node`'s
/// scheduler does once the waiting period is over (the time moved 31 days
/// ahead), in this process, as in the single-node backup test. Every node
/// must be stopped (this process takes node `node`'s identity and data
/// directory, and must lead the scheduler job: a stopped node's lease may
/// take up to 2Δ to go, hence the retries).
async fn run_scheduler_past_deletions(nodes: &ClusterNodes, node: usize) -> usize {
    let config = Config::load(&nodes.config_file(node)).expect("config");
    tokio::task::spawn_blocking(move || {
        let service = KmsService::open(&config).expect("open the node's service in-process");
        for _ in 0..40 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_millis() as u64;
            let pass = service.run_scheduler_pass_at(now + 31 * 24 * 3600 * 1000);
            if pass.deleted > 0 {
                assert_eq!(pass.failed, 0, "{pass:?}");
                return pass.deleted;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        0
    })
    .await
    .expect("scheduler pass")
}

/// `kms ARGS` with node `node`'s SoftHSM2 configuration (the restore checks
/// the roots in its token): (success, stdout, stderr).
fn kms(nodes: &ClusterNodes, node: usize, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(kms_binary())
        .args(args)
        .env("SOFTHSM2_CONF", nodes.node(node).token().softhsm_conf())
        .env("KMS_LOG", "warn,cryptoki::mechanism=off")
        .output()
        .expect("run kms");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// etcd's current revision and every key under kms's prefix.
fn etcd_state(etcd: &EtcdCluster) -> (u64, String) {
    let (ok, out, err) = etcd.etcdctl(
        &etcd.endpoints(),
        &["get", "--prefix", KMS_PREFIX, "--keys-only", "-w", "json"],
    );
    assert!(ok, "etcdctl get: {err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("etcdctl JSON");
    let revision = json["header"]["revision"].as_u64().expect("revision");
    (revision, json["kvs"].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_backup_taken_under_load_restores_every_acknowledged_ciphertext_and_no_destroyed_key()
 {
    let etcd = EtcdCluster::start(3);
    let mut nodes = ClusterNodes::new(3, Some(&etcd.client_settings()), DELTA);
    nodes.start_all();
    nodes.wait_all_serving().await;
    let mut keys = Vec::new();
    for i in 0..4 {
        keys.push(create_key(&nodes, i % 3).await);
    }
    let doomed = keys[3].clone();
    let endpoints = (0..nodes.len())
        .map(|i| nodes.endpoint(i))
        .collect::<Vec<_>>()
        .join(",");

    // Load on every node, and a cluster backup in the middle of it.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&nodes, &keys, &acked, &stop);
    wait_for_acks(&acked, 30).await;
    let backup = nodes.backup_dir().join("cluster-1");
    let backup_arg = backup.display().to_string();
    let config0 = nodes.config_file(0).display().to_string();
    let (endpoint0, endpoints_arg) = (nodes.endpoint(0), endpoints.clone());
    let created = tokio::task::spawn_blocking(move || {
        run_cli(
            &endpoint0,
            &[
                "--json",
                "backup",
                "create",
                "--cluster",
                "--config",
                &config0,
                "--endpoints",
                &endpoints_arg,
                "--out",
                &backup_arg,
            ],
            b"",
        )
    })
    .await
    .expect("join");
    assert!(
        created.0,
        "kms backup create --cluster failed: {}",
        created.2
    );
    let report: serde_json::Value = serde_json::from_slice(&created.1).expect("JSON");
    assert_eq!(report["root_epochs"], serde_json::json!([1]), "{report}");
    assert_eq!(
        report["nodes"].as_array().map(Vec::len),
        Some(3),
        "{report}"
    );
    assert!(
        report["etcd_revision"].as_i64().unwrap_or(0) > 0,
        "{report}"
    );
    assert!(backup.join("etcd/snapshot.db").is_file());
    assert!(backup.join("nodes/node-2/manifest.json").is_file());
    let at_backup = acked.lock().expect("lock").len();
    wait_for_acks(&acked, at_backup + 30).await;
    stop.store(true, Ordering::Release);
    for task in load {
        task.await.expect("load task");
    }

    // After the backup: rotations and ciphertexts under the new versions,
    // a new key, and a key deleted (its ciphertexts must die with it).
    let mut after = Vec::new();
    for (i, key) in keys[..3].iter().enumerate() {
        rotate(&nodes, i, key).await;
        after.push(encrypt(&nodes, (i + 1) % 3, key, format!("after {key}").as_bytes()).await);
    }
    let late = create_key(&nodes, 2).await;
    after.push(encrypt(&nodes, 1, &late, b"under a key the backup lacks").await);
    after.push(encrypt(&nodes, 0, &doomed, b"under the key that will be deleted").await);
    acked.lock().expect("lock").extend(after);
    KeyManagementClient::new(nodes.channel(1))
        .schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
            key_id: doomed.clone(),
            pending_window_days: Some(7),
        })
        .await
        .expect("ScheduleKeyDeletion");
    for i in 0..nodes.len() {
        nodes.stop(i);
    }
    assert_eq!(
        run_scheduler_past_deletions(&nodes, 0).await,
        1,
        "the deletion was not carried out"
    );
    nodes.start_all();
    nodes.wait_all_serving().await;
    let mut more = Vec::new();
    for (i, key) in keys[..3].iter().chain([&late]).enumerate() {
        more.push(encrypt(&nodes, i % 3, key, format!("more {key}").as_bytes()).await);
    }
    acked.lock().expect("lock").extend(more);
    let mut latest_before: BTreeMap<String, u32> = BTreeMap::new();
    for key in keys[..3].iter().chain([&late]) {
        let numbers = versions(&nodes, 0, key).await;
        latest_before.insert(
            key.clone(),
            numbers.iter().map(|v| v.version).max().expect("versions"),
        );
    }

    // Stop every node; etcd restored from the snapshot into new members.
    for i in 0..nodes.len() {
        nodes.stop(i);
    }
    let restored = EtcdCluster::start_from_snapshot(3, &backup.join("etcd/snapshot.db"));
    for i in 0..nodes.len() {
        nodes.set_etcd(i, restored.client_settings());
    }
    let config0 = nodes.config_file(0).display().to_string();
    let ledger_args: Vec<String> = (0..nodes.len())
        .map(|i| format!("{}={}", nodes.node(i).id(), nodes.data_dir(i).display()))
        .collect();
    let old_endpoints = etcd.endpoints().join(",");
    let mut restore_args = vec![
        "--json",
        "backup",
        "restore",
        "--cluster",
        "--from",
        backup.to_str().expect("UTF-8"),
        "--config",
        &config0,
        "--replaced-etcd-endpoints",
        &old_endpoints,
    ];
    for arg in &ledger_args {
        restore_args.extend(["--node", arg.as_str()]);
    }

    // A damaged backup is refused, and nothing changes.
    let snapshot = backup.join("etcd/snapshot.db");
    let original = std::fs::read(&snapshot).expect("snapshot");
    let mut damaged = original.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x01;
    std::fs::write(&snapshot, &damaged).expect("damage the snapshot");
    let state_before = etcd_state(&restored);
    let (ok, _, err) = kms(&nodes, 0, &restore_args);
    assert!(!ok, "a damaged backup was restored");
    assert!(
        err.contains("etcd/snapshot.db does not match the manifest: its SHA-256 differs")
            && err.contains("nothing was restored"),
        "{err}"
    );
    assert_eq!(
        etcd_state(&restored),
        state_before,
        "the refused restore changed etcd"
    );
    std::fs::write(&snapshot, &original).expect("repair the snapshot");

    let (ok, out, err) = kms(&nodes, 0, &restore_args);
    assert!(ok, "kms backup restore --cluster failed: {err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        report["replayed_destructions"],
        serde_json::json!([doomed]),
        "{report}"
    );
    assert_eq!(
        report["keys_put_back"],
        serde_json::json!([late]),
        "{report}"
    );
    assert!(
        report["versions_put_back"]
            .as_array()
            .is_some_and(|v| v.len() >= 3),
        "{report}"
    );
    // Everything stopped but the restored cluster.
    drop(etcd);

    // All three at once: each sees the pending restore; one rotates.
    nodes.start_together(&[0, 1, 2]);
    nodes.wait_all_serving().await;

    // Every acknowledged blob decrypts on every node; the deleted key's do not.
    let acked = acked.lock().expect("lock").clone();
    let (dead, live): (Vec<Acked>, Vec<Acked>) = acked.into_iter().partition(|a| a.key == doomed);
    assert!(!dead.is_empty() && !live.is_empty());
    for node in 0..nodes.len() {
        let mut crypto = CryptoClient::new(nodes.channel(node));
        for (n, item) in live.iter().enumerate() {
            let plaintext = crypto
                .decrypt(pb::DecryptRequest {
                    ciphertext_blob: item.blob.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("acknowledged blob {n} lost on node {node}: {e}"))
                .into_inner()
                .plaintext;
            assert_eq!(plaintext, item.plaintext, "blob {n} on node {node}");
        }
        for item in &dead {
            assert!(
                crypto
                    .decrypt(pb::DecryptRequest {
                        ciphertext_blob: item.blob.clone(),
                        ..Default::default()
                    })
                    .await
                    .is_err(),
                "a blob of the deleted key decrypted on node {node}"
            );
        }
        // The deleted key stays deleted: every version destroyed.
        let doomed_versions = versions(&nodes, node, &doomed).await;
        assert!(!doomed_versions.is_empty());
        assert!(
            doomed_versions
                .iter()
                .all(|v| v.state == pb::KeyVersionState::Destroyed as i32),
            "{doomed_versions:?}"
        );
        // Every enabled key rotated exactly once (by one node, not by each):
        // its primary is the version right after every version used before.
        for (key, latest) in &latest_before {
            let meta = describe(&nodes, node, key).await;
            assert_eq!(meta.state, pb::KeyState::Enabled as i32, "{key}");
            assert_eq!(meta.primary_version, latest + 1, "{key} on node {node}");
        }
    }

    // The audit logs of the three nodes still verify together.
    let (ok, out, err) = run_cli(
        &nodes.endpoint(0),
        &["audit", "verify", "--cluster", "--endpoints", &endpoints],
        b"",
    );
    let out = String::from_utf8_lossy(&out);
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("Cluster audit log  VALID\n"), "{out}");
}
