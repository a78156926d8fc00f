//! Root epochs across per-node HSMs (issue 15; design note
//! `hierarchy-and-cluster.md` §1.5, §2.3): three real etcd members and
//! three `kms` nodes, each with its own SoftHSM2 token holding the same
//! test root `kms-root/1`. A new root added to one node's HSM is adopted
//! for wrapping only once every registered node holds it (the refusal names
//! the nodes lacking it); a node whose HSM lacks an epoch the catalogue
//! references refuses to start; once adopted, the re-wrap runs on one node
//! and every acknowledged blob still decrypts on every node, also after
//! the old root is destroyed on one of them.
//!
//! Importing the same root value into each token with
//! `kms_hsm::testing::import_test_root` stands in for the HSM vendor's key
//! cloning.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use kms_proto::v1::admin_client::AdminClient;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_tests::cluster::EtcdCluster;
use kms_tests::cluster_nodes::{ClusterNodes, TEST_ROOT_EPOCH};
use tonic::Code;

/// Δ (`staleness_bound_ms`) of every node.
const DELTA: Duration = Duration::from_secs(2);
/// The epoch the test adds.
const NEW_EPOCH: u32 = TEST_ROOT_EPOCH + 1;
/// How long a state the nodes reach on their own (following the active
/// root, finishing the re-wrap) may take before the test gives up: a bound
/// against hangs on a loaded 2-core machine, not a measurement.
const SETTLE_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Acked {
    blob: Vec<u8>,
    plaintext: Vec<u8>,
}

/// Encrypts one fresh plaintext on `node`.
async fn encrypt(nodes: &ClusterNodes, node: usize, key: &str, n: usize) -> Acked {
    let plaintext = format!("roots {node} {n}").into_bytes();
    let blob = CryptoClient::new(nodes.channel(node))
        .encrypt(pb::EncryptRequest {
            key_id: key.to_owned(),
            plaintext: plaintext.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("Encrypt on node {node}: {e}"))
        .into_inner()
        .ciphertext_blob;
    Acked { blob, plaintext }
}

/// Every acknowledged blob decrypts to its plaintext on every node.
async fn decrypt_everywhere(nodes: &ClusterNodes, acked: &[Acked]) {
    for node in 0..nodes.len() {
        let mut crypto = CryptoClient::new(nodes.channel(node));
        for (n, item) in acked.iter().enumerate() {
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
    }
}

/// Imports root `epoch` with `value` into node `i`'s token (the "clone").
fn clone_root_into(nodes: &ClusterNodes, i: usize, epoch: u32, value: &[u8; 32]) {
    let token = nodes.node(i).token();
    kms_hsm::testing::import_test_root(
        token.module_path(),
        token.label(),
        &token.so_pin_source().read().expect("SO PIN"),
        &token.pin_source().read().expect("user PIN"),
        epoch,
        value,
    )
    .unwrap_or_else(|e| panic!("import root {epoch} into node {i}'s token: {e}"));
}

async fn reload(nodes: &ClusterNodes, i: usize) -> Result<pb::ReloadResponse, tonic::Status> {
    AdminClient::new(nodes.channel(i))
        .reload(pb::ReloadRequest::default())
        .await
        .map(tonic::Response::into_inner)
}

async fn roots(nodes: &ClusterNodes, i: usize) -> pb::ListRootsResponse {
    AdminClient::new(nodes.channel(i))
        .list_roots(pb::ListRootsRequest::default())
        .await
        .unwrap_or_else(|e| panic!("ListRoots on node {i}: {e}"))
        .into_inner()
}

/// Records (versions, service keys) node `i` counts under `epoch`.
fn references(report: &pb::ListRootsResponse, epoch: u32) -> (u64, u64) {
    report
        .roots
        .iter()
        .find(|r| r.epoch == epoch)
        .map_or((0, 0), |r| (r.versions, r.service_keys))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_root_is_adopted_only_once_every_node_holds_it() {
    let etcd = EtcdCluster::start(3);
    let mut nodes = ClusterNodes::new(3, Some(&etcd.client_settings()), DELTA);
    nodes.start_all();
    nodes.wait_all_serving().await;

    let key = KeyManagementClient::new(nodes.channel(0))
        .create_key(pb::CreateKeyRequest::default())
        .await
        .expect("CreateKey")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id;
    let mut acked = Vec::new();
    for node in 0..3 {
        acked.push(encrypt(&nodes, node, &key, acked.len()).await);
    }

    let mut value = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut value))
        .expect("random root value");

    // The new root on node-1 only: adopting it is refused, naming the
    // two nodes that lack it, and the cluster keeps wrapping under root 1.
    clone_root_into(&nodes, 0, NEW_EPOCH, &value);
    let refused = reload(&nodes, 0)
        .await
        .expect_err("adoption must be refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let message = refused.message();
    assert!(
        message.contains("kms-root/2") && message.contains("node-2") && message.contains("node-3"),
        "{message}"
    );
    assert!(!message.contains("node-1"), "node-1 holds it: {message}");
    assert_eq!(roots(&nodes, 0).await.active_epoch, TEST_ROOT_EPOCH);
    acked.push(encrypt(&nodes, 0, &key, acked.len()).await);

    // Cloned into node-2 too: node-3 alone is named now.
    clone_root_into(&nodes, 1, NEW_EPOCH, &value);
    let refused = reload(&nodes, 1).await.expect_err("node-3 still lacks it");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("node-3") && !refused.message().contains("node-2"),
        "{}",
        refused.message()
    );
    for node in 0..3 {
        assert_eq!(roots(&nodes, node).await.active_epoch, TEST_ROOT_EPOCH);
    }

    // node-3 leaves; the two remaining nodes hold root 2: it is adopted.
    nodes.stop(2);
    let started = Instant::now();
    let adopted = loop {
        match reload(&nodes, 0).await {
            Ok(reply) => break reply,
            // node-3's registration ends with its lease (within 2Δ).
            Err(status) if started.elapsed() < SETTLE_WITHIN => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(status) => panic!("root 2 not adopted without node-3: {status:?}"),
        }
    };
    assert_eq!(adopted.active_root_epoch, NEW_EPOCH, "{adopted:?}");

    // node-3 cannot start without the root the catalogue now references.
    let mut child = Command::new(kms_tests::kms_binary())
        .args(["serve", "--config"])
        .arg(nodes.config_file(2))
        .env("SOFTHSM2_CONF", nodes.node(2).token().softhsm_conf())
        .env("KMS_LOG", "info,cryptoki::mechanism=off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kms serve");
    let mut stderr_pipe = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for kms serve") {
            break status;
        }
        if started.elapsed() > SETTLE_WITHIN {
            let _ = child.kill();
            let _ = child.wait();
            panic!("node-3 kept running without root 2");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = reader.join().expect("stderr reader");
    assert!(
        !status.success(),
        "node-3 exited 0 without root 2: {stderr}"
    );
    assert!(
        stderr.contains("root key epoch 2 (kms-root/2)")
            && stderr.contains("this node's HSM does not hold")
            && stderr.contains("clone that root into this node's HSM"),
        "{stderr}"
    );

    // Cloned into node-3: it starts and follows the cluster's active root.
    clone_root_into(&nodes, 2, NEW_EPOCH, &value);
    nodes.start(2);
    nodes.wait_all_serving().await;
    let started = Instant::now();
    for node in 0..3 {
        loop {
            let report = roots(&nodes, node).await;
            if report.active_epoch == NEW_EPOCH {
                break;
            }
            assert!(
                started.elapsed() < SETTLE_WITHIN,
                "node {node} still wraps under {}: {}",
                report.active_epoch,
                nodes.log(node)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // The re-wrap moves everything under root 1 to root 2.
    loop {
        let report = roots(&nodes, 0).await;
        if references(&report, TEST_ROOT_EPOCH) == (0, 0) {
            break;
        }
        assert!(
            started.elapsed() < SETTLE_WITHIN,
            "root 1 still referenced: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // …on one node, the job's leader: the service keys were re-wrapped once.
    let rewrapping: Vec<usize> = (0..3)
        .filter(|&i| {
            nodes
                .log(i)
                .contains("root re-wrap: service key re-wrapped")
        })
        .collect();
    assert_eq!(rewrapping.len(), 1, "nodes that re-wrapped: {rewrapping:?}");

    for node in 0..3 {
        acked.push(encrypt(&nodes, node, &key, acked.len()).await);
    }
    // Root 1 is no longer needed anywhere: destroying it on node-1 is
    // allowed, and every acknowledged blob still decrypts on every node.
    AdminClient::new(nodes.channel(0))
        .destroy_root(pb::DestroyRootRequest {
            epoch: TEST_ROOT_EPOCH,
        })
        .await
        .expect("DestroyRoot 1 once nothing references it");
    let refused = AdminClient::new(nodes.channel(1))
        .destroy_root(pb::DestroyRootRequest { epoch: NEW_EPOCH })
        .await
        .expect_err("the cluster's active root");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    decrypt_everywhere(&nodes, &acked).await;
    drop(nodes);
    drop(etcd);
}

/// A cluster node whose token holds no root would make key versions as
/// token objects, which no other node's HSM holds: it refuses to start,
/// naming the fix.
#[tokio::test]
async fn a_cluster_node_without_a_root_refuses_to_start() {
    let etcd = EtcdCluster::start(1);
    let nodes = ClusterNodes::new(1, Some(&etcd.client_settings()), DELTA);
    let cluster = kms::config::Config::load(&nodes.config_file(0))
        .expect("node config")
        .cluster;
    assert!(cluster.is_some());
    // The same node settings, on a fresh token without any root.
    let env = kms_tests::TestEnv::new();
    let mut config = env.config();
    config.cluster = cluster;
    let outcome =
        tokio::task::spawn_blocking(move || kms::service::KmsService::open(&config).map(drop))
            .await
            .expect("join");
    let error = outcome.expect_err("a cluster node without a root must not start");
    let message = error.to_string();
    assert!(
        message.contains("cluster node") && message.contains("has no root key"),
        "{message}"
    );
    drop(nodes);
    drop(etcd);
}

/// DestroyRoot of the old epoch is refused while a node still wraps under
/// it (here node-2, frozen with SIGSTOP after it published its roots, so
/// it cannot follow the newly adopted root), naming that node; once it runs
/// again it follows, the re-wrap empties the old epoch, and the destroy
/// goes through.
#[tokio::test]
async fn destroying_a_root_a_node_still_wraps_under_is_refused_naming_the_node() {
    // A larger Δ: node-2's lease (about 2Δ) must outlive the two calls made
    // while it is frozen.
    let delta = Duration::from_secs(5);
    let etcd = EtcdCluster::start(3);
    let mut nodes = ClusterNodes::new(2, Some(&etcd.client_settings()), delta);
    nodes.start_all();
    nodes.wait_all_serving().await;
    let key = KeyManagementClient::new(nodes.channel(0))
        .create_key(pb::CreateKeyRequest::default())
        .await
        .expect("CreateKey")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id;
    let mut acked = vec![encrypt(&nodes, 0, &key, 0).await];

    let mut value = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut value))
        .expect("random root value");
    // node-2 holds root 2 and says so (its reload is refused: node-1 lacks it).
    clone_root_into(&nodes, 1, NEW_EPOCH, &value);
    let refused = reload(&nodes, 1).await.expect_err("node-1 lacks root 2");
    assert!(refused.message().contains("node-1"), "{refused:?}");
    // node-2 freezes: it can no longer follow a new active root.
    nodes.signal(1, "STOP");
    clone_root_into(&nodes, 0, NEW_EPOCH, &value);
    let adopted = reload(&nodes, 0).await.expect("every node holds root 2");
    assert_eq!(adopted.active_root_epoch, NEW_EPOCH, "{adopted:?}");
    let refused = AdminClient::new(nodes.channel(0))
        .destroy_root(pb::DestroyRootRequest {
            epoch: TEST_ROOT_EPOCH,
        })
        .await
        .expect_err("node-2 still wraps under root 1");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("is still the wrapping root of cluster node(s) node-2")
            && refused.message().contains("kms admin reload"),
        "{}",
        refused.message()
    );

    // node-2 runs again, follows root 2; the re-wrap empties root 1.
    nodes.signal(1, "CONT");
    let started = Instant::now();
    loop {
        let outcome = AdminClient::new(nodes.channel(0))
            .destroy_root(pb::DestroyRootRequest {
                epoch: TEST_ROOT_EPOCH,
            })
            .await;
        match outcome {
            Ok(_) => break,
            Err(status)
                if status.code() == Code::FailedPrecondition
                    && started.elapsed() < SETTLE_WITHIN =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(status) => panic!("root 1 never became destroyable: {status:?}"),
        }
    }
    // node-1's HSM no longer holds root 1; everything still decrypts on
    // both nodes, and node-2 encrypts under root 2.
    nodes.wait_all_serving().await;
    acked.push(encrypt(&nodes, 1, &key, 1).await);
    decrypt_everywhere(&nodes, &acked).await;
    drop(nodes);
    drop(etcd);
}
