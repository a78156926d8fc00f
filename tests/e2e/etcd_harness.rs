//! Self-tests of the cluster harness (`kms_tests::cluster`,
//! `kms_tests::cluster_nodes`) against real etcd processes and real kms
//! nodes: what the cluster fault tests rely on must itself be shown to
//! work — a killed leader is replaced, two stopped members out of three
//! stop all writes until they continue, the proxy really partitions, the
//! TLS variant's role confines user `kms` to `/kms/v1/`, compaction
//! really discards history, and N nodes on one imported root serve.

use std::time::Duration;

use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_tests::cluster::{EtcdCluster, TcpProxy};
use kms_tests::cluster_nodes::{ClusterNodes, TEST_ROOT_EPOCH};

/// `etcdctl put` through `endpoints`: whether it succeeded.
fn put(cluster: &EtcdCluster, endpoints: &[String], key: &str, value: &str) -> bool {
    cluster.etcdctl(endpoints, &["put", key, value]).0
}

fn get(cluster: &EtcdCluster, endpoints: &[String], key: &str) -> Option<String> {
    let (ok, stdout, _) = cluster.etcdctl(endpoints, &["get", key, "--print-value-only"]);
    ok.then(|| stdout.trim().to_owned())
}

#[test]
fn etcd_leader_kill_elects_a_new_leader_and_the_member_rejoins() {
    let mut cluster = EtcdCluster::start(3);
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let term = cluster.status(leader).expect("leader status").raft_term;
    assert!(put(&cluster, &cluster.endpoints(), "/kms/v1/a", "1"));

    cluster.kill(leader);
    let next = cluster.wait_leader(Duration::from_secs(15));
    assert_ne!(next, leader, "a killed member cannot lead");
    let next_term = cluster.status(next).expect("new leader status").raft_term;
    assert!(
        next_term > term,
        "an election raises the term: {term} -> {next_term}"
    );
    assert!(put(
        &cluster,
        &cluster.running_endpoints(),
        "/kms/v1/a",
        "2"
    ));

    cluster.restart(leader);
    // The restarted member catches up with what was written without it.
    let mut seen = None;
    for _ in 0..50 {
        seen = get(&cluster, &[cluster.endpoint(leader)], "/kms/v1/a");
        if seen.as_deref() == Some("2") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seen.as_deref(), Some("2"));
}

#[test]
fn etcd_two_stopped_members_of_three_stop_writes_until_they_continue() {
    let mut cluster = EtcdCluster::start(3);
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    // Stop the leader and one follower: the remaining member has no quorum.
    cluster.stop(leader);
    cluster.stop(others[0]);
    let alone = vec![cluster.endpoint(others[1])];
    assert!(
        !put(&cluster, &alone, "/kms/v1/b", "1"),
        "one member of three must not accept a write"
    );
    assert_eq!(cluster.leader(), None);

    cluster.cont(leader);
    cluster.cont(others[0]);
    let mut written = false;
    for _ in 0..100 {
        if put(&cluster, &alone, "/kms/v1/b", "2") {
            written = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(written, "the cluster recovers by itself after SIGCONT");
    cluster.wait_leader(Duration::from_secs(10));
}

#[test]
fn tcp_proxy_cut_drops_connections_and_heal_forwards_again() {
    let cluster = EtcdCluster::start(1);
    let proxy = TcpProxy::start(cluster.client_addr(0));
    let through = vec![proxy.url()];
    assert!(put(&cluster, &through, "/kms/v1/p", "1"));
    assert_eq!(get(&cluster, &through, "/kms/v1/p").as_deref(), Some("1"));

    proxy.cut();
    assert_eq!(proxy.active_connections(), 0);
    assert!(
        !put(&cluster, &through, "/kms/v1/p", "2"),
        "a cut proxy must not forward"
    );
    // The member itself is fine: only the path through the proxy is cut.
    assert!(put(&cluster, &cluster.endpoints(), "/kms/v1/p", "3"));

    proxy.heal();
    assert_eq!(get(&cluster, &through, "/kms/v1/p").as_deref(), Some("3"));
}

/// A long-lived connection (an etcd watch, as kms keeps one) is dropped
/// by `cut`, not only new connections refused.
#[test]
fn tcp_proxy_cut_ends_a_watch_in_progress() {
    let cluster = EtcdCluster::start(1);
    let proxy = TcpProxy::start(cluster.client_addr(0));
    let mut watch = std::process::Command::new(kms_tests::cluster::etcdctl_binary())
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", proxy.url()))
        .args(["watch", "/kms/v1/w"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("etcdctl watch");
    let mut connected = false;
    for _ in 0..100 {
        if proxy.active_connections() > 0 {
            connected = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let watching = connected;
    proxy.cut();
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(watching, "the watch never connected through the proxy");
    assert_eq!(proxy.active_connections(), 0);
}

#[test]
fn etcd_tls_role_confines_user_kms_to_its_prefix() {
    let cluster = EtcdCluster::start_tls(1);
    let settings = cluster.client_settings();
    assert!(settings.endpoints[0].starts_with("https://"));
    let (user, password_file) = settings.user.clone().expect("user");
    assert_eq!(user, "kms");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&password_file)
        .expect("password file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let (ok, _, stderr) = cluster.etcdctl_as_kms(&["put", "/kms/v1/keys/k", "v"]);
    assert!(ok, "kms may write under its prefix: {stderr}");
    let (ok, stdout, _) = cluster.etcdctl_as_kms(&["get", "/kms/v1/keys/k", "--print-value-only"]);
    assert!(ok);
    assert_eq!(stdout.trim(), "v");
    for denied in [
        &["put", "/other/k", "v"][..],
        &["put", "/kms/v2/k", "v"][..],
        &["get", "/other/k"][..],
    ] {
        let (ok, _, stderr) = cluster.etcdctl_as_kms(denied);
        assert!(!ok, "{denied:?} outside /kms/v1/ must be refused");
        assert!(stderr.contains("permission denied"), "{denied:?}: {stderr}");
    }
    // Without a client certificate the TLS handshake fails.
    let output = std::process::Command::new(kms_tests::cluster::etcdctl_binary())
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", settings.endpoints[0]))
        .arg("--cacert")
        .arg(cluster.ca_file().expect("ca"))
        .args([
            "--command-timeout=3s",
            "--dial-timeout=2s",
            "get",
            "/kms/v1/keys/k",
        ])
        .output()
        .expect("etcdctl");
    assert!(
        !output.status.success(),
        "a client without a certificate got in"
    );
}

#[test]
fn etcd_compact_discards_older_revisions() {
    let cluster = EtcdCluster::start(1);
    let endpoints = cluster.endpoints();
    for i in 0..5 {
        assert!(put(&cluster, &endpoints, "/kms/v1/c", &i.to_string()));
    }
    let (ok, _, _) = cluster.etcdctl(&endpoints, &["get", "/kms/v1/c", "--rev=2"]);
    assert!(ok, "revision 2 is readable before compaction");
    let revision = cluster.compact();
    assert!(revision >= 6);
    let (ok, _, stderr) = cluster.etcdctl(&endpoints, &["get", "/kms/v1/c", "--rev=2"]);
    assert!(!ok);
    assert!(stderr.contains("compacted"), "{stderr}");
}

/// The node harness without `[cluster]`: two independent single-node kms
/// processes whose tokens hold the imported test root. Each accepts the
/// root at start-up (wrapped versions on), serves, survives SIGKILL and a
/// restart on the same port, and a version's blob shows root epoch 1.
#[tokio::test]
async fn cluster_nodes_start_on_the_imported_root_and_restart() {
    let mut nodes = ClusterNodes::new(2, None, Duration::from_secs(2));
    nodes.start_all();
    nodes.wait_all_serving().await;
    let mut blobs = Vec::new();
    for i in 0..nodes.len() {
        let mut keys = KeyManagementClient::new(nodes.channel(i));
        let key = keys
            .create_key(pb::CreateKeyRequest::default())
            .await
            .expect("CreateKey")
            .into_inner()
            .key_metadata
            .expect("metadata")
            .key_id;
        let versions = keys
            .list_key_versions(pb::ListKeyVersionsRequest {
                key_id: key.clone(),
                ..Default::default()
            })
            .await
            .expect("ListKeyVersions")
            .into_inner()
            .versions;
        assert_eq!(versions.len(), 1);
        assert_eq!(versions[0].root_epoch, TEST_ROOT_EPOCH);
        let blob = CryptoClient::new(nodes.channel(i))
            .encrypt(pb::EncryptRequest {
                key_id: key,
                plaintext: b"node".to_vec(),
                ..Default::default()
            })
            .await
            .expect("Encrypt")
            .into_inner()
            .ciphertext_blob;
        blobs.push(blob);
    }
    nodes.kill(0);
    assert_eq!(nodes.health(0).await, None, "a killed node answers nothing");
    nodes.restart(0);
    nodes.wait_serving(0).await;
    let plaintext = CryptoClient::new(nodes.channel(0))
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: blobs[0].clone(),
            ..Default::default()
        })
        .await
        .expect("Decrypt after restart")
        .into_inner()
        .plaintext;
    assert_eq!(plaintext, b"node");
}
