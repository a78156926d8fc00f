//! Per-version use records in a cluster (issues 15 and 18): each node
//! counts the uses it served and stores them in etcd under its own rows;
//! GetKeyLastUsage on any node sums every node's, and the destruction
//! guard sees a use made on another node. A node SIGKILLed before its
//! flush loses none of its uses (replayed from its audit log at start).
//! Three real etcd members and three `kms` processes.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_tests::cluster::EtcdCluster;
use kms_tests::cluster_nodes::ClusterNodes;
use tonic::Code;

/// Δ (`staleness_bound_ms`) of every node.
const DELTA: Duration = Duration::from_secs(2);
/// How long the test waits for another node's uses to show: one flush
/// interval (5 s, the default) plus a generous margin for a loaded machine.
/// A bound against hangs, not a measurement.
const VISIBLE_WITHIN: Duration = Duration::from_secs(45);

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms")
}

/// Decrypts `blob` on `node`, retrying while the node has not yet seen the
/// key (its catalogue view follows etcd by a watch).
async fn decrypt_on(nodes: &ClusterNodes, node: usize, blob: &[u8]) -> Vec<u8> {
    let started = Instant::now();
    loop {
        let reply = CryptoClient::new(nodes.channel(node))
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: blob.to_vec(),
                ..Default::default()
            })
            .await;
        match reply {
            Ok(reply) => return reply.into_inner().plaintext,
            Err(status)
                if status.code() == Code::NotFound && started.elapsed() < VISIBLE_WITHIN =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("Decrypt on node {node}: {status}"),
        }
    }
}

/// Version 1's (encrypt count, decrypt count, last decrypt ms) as node
/// `node` reports it.
async fn version_1_usage(nodes: &ClusterNodes, node: usize, key: &str) -> (u64, u64, u64) {
    let reply = KeyManagementClient::new(nodes.channel(node))
        .get_key_last_usage(pb::GetKeyLastUsageRequest {
            key_id: key.to_owned(),
            version: 1,
        })
        .await
        .unwrap_or_else(|e| panic!("GetKeyLastUsage on node {node}: {e}"))
        .into_inner();
    let usage = reply.versions[0].usage.expect("usage");
    let last = usage.last_decrypt_time.map_or(0, |t| {
        u64::try_from(t.seconds).expect("s") * 1000
            + u64::try_from(t.nanos).expect("ns") / 1_000_000
    });
    (usage.encrypt_count, usage.decrypt_count, last)
}

#[tokio::test]
async fn uses_on_every_node_are_summed_and_guard_destruction_everywhere() {
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
    // Four encryptions on node-1 only.
    let mut blobs = Vec::new();
    for n in 0..4 {
        let plaintext = format!("usage {n}").into_bytes();
        let blob = CryptoClient::new(nodes.channel(0))
            .encrypt(pb::EncryptRequest {
                key_id: key.clone(),
                plaintext: plaintext.clone(),
                ..Default::default()
            })
            .await
            .expect("Encrypt on node-1")
            .into_inner()
            .ciphertext_blob;
        blobs.push((blob, plaintext));
    }

    // Decryptions on node-2 (three) and node-3 (two); node-1 decrypts none.
    let before_decrypts = now_ms();
    for (blob, plaintext) in &blobs[..3] {
        assert_eq!(&decrypt_on(&nodes, 1, blob).await, plaintext);
    }
    for (blob, plaintext) in &blobs[2..] {
        assert_eq!(&decrypt_on(&nodes, 2, blob).await, plaintext);
    }
    // node-3 is SIGKILLed at once, before its first flush (5 s): its two
    // uses exist only in its audit log, and come back when it starts.
    nodes.kill(2);
    nodes.start(2);
    nodes.wait_serving(2).await;

    // Every node reports all of them, summed over nodes.
    for node in 0..3 {
        let started = Instant::now();
        loop {
            let (encrypts, decrypts, last) = version_1_usage(&nodes, node, &key).await;
            if (encrypts, decrypts) == (4, 5) {
                assert!(last >= before_decrypts.saturating_sub(1000), "{last}");
                break;
            }
            assert!(
                encrypts <= 4 && decrypts <= 5,
                "over-counted on node {node}: {encrypts} encrypts, {decrypts} decrypts"
            );
            assert!(
                started.elapsed() < VISIBLE_WITHIN,
                "node {node} shows {encrypts} encrypts and {decrypts} decrypts, expected 4 and 5"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // node-1 never decrypted with version 1, but the guard is cluster-wide:
    // scheduling its destruction there is refused, naming the last use.
    let mut keys = KeyManagementClient::new(nodes.channel(0));
    keys.rotate_key(pb::RotateKeyRequest {
        key_id: key.clone(),
    })
    .await
    .expect("RotateKey");
    let refused = keys
        .schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest {
            key_id: key.clone(),
            version: 1,
            pending_window_days: Some(1),
            override_recent_use: false,
        })
        .await
        .expect_err("used on other nodes within the quiet period");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("was last used to decrypt at 20"),
        "{}",
        refused.message()
    );
    drop(nodes);
    drop(etcd);
}
