//! Audit across nodes (issue 15 item 3, design note §2.3.6), end to end.
//!
//! Nodes each alone on its own one-member etcd (a node id, no peers, so no
//! witness event is written): VerifyAuditLog checks heads witnessed for the
//! node against its real log and refuses heads of other nodes; `kms audit
//! verify --cluster` and `kms audit list --endpoints` over two such nodes.
//!
//! Three nodes on one three-member etcd witness each other; one node's
//! audit DB is truncated while it is stopped, and `kms audit verify
//! --cluster` names it.

use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use kms_proto::v1::audit_client::AuditClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_tests::cluster::EtcdCluster;
use kms_tests::cluster_nodes::ClusterNodes;
use kms_tests::{TestEnv, TestServer, run_cli};
use tonic::Code;

use super::{create_key, encrypt};

/// A server; with a node id, a cluster node over its own one-member etcd
/// (returned, to be kept alive for the test's length), so that it has a
/// node id but no peers, and a root key on its token.
async fn node(env: &TestEnv, id: Option<&str>) -> (TestServer, Option<EtcdCluster>) {
    if id.is_some() {
        // A cluster node wraps its versions under a root (it refuses to
        // start without one).
        super::wrapped::init_root(env);
    }
    let mut config = env.config();
    let etcd = id.map(|_| EtcdCluster::start(1));
    config.cluster = id
        .zip(etcd.as_ref())
        .map(|(id, etcd)| kms::config::ClusterConfig {
            node_id: id.to_owned(),
            etcd_endpoints: etcd.endpoints(),
            etcd_prefix: kms::config::DEFAULT_ETCD_PREFIX.to_owned(),
            staleness_bound: Duration::from_secs(2),
            etcd_ca_file: None,
            etcd_cert_file: None,
            etcd_key_file: None,
            etcd_user: None,
            etcd_password_file: None,
        });
    (env.start_with(config).await, etcd)
}

async fn all_events(server: &TestServer) -> (Vec<pb::AuditEvent>, String) {
    let reply = server
        .audit()
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    (reply.events, reply.node_id)
}

fn head(node: &str, sequence: u64, hash: Vec<u8>) -> pb::WitnessedHead {
    pb::WitnessedHead {
        node: node.to_owned(),
        sequence,
        hash,
        published_ms: 1,
        checkpoint_mac: vec![0; 32],
    }
}

#[tokio::test]
async fn verify_audit_log_checks_the_heads_witnessed_for_the_node_against_its_log() {
    let env = TestEnv::new();
    let (server, _etcd) = node(&env, Some("node-a")).await;
    let key = create_key(&server, "witnessed").await;
    encrypt(&server, &key, b"p", &[]).await;
    let (events, node_id) = all_events(&server).await;
    assert_eq!(node_id, "node-a");
    let last = events.last().expect("events").clone();
    let mut wrong = last.hash.clone();
    wrong[0] ^= 1;
    let reply = server
        .audit()
        .verify_audit_log(pb::VerifyAuditLogRequest {
            witnessed_for_node: vec![
                head("node-a", last.sequence, last.hash.clone()),
                head("node-a", last.sequence + 1000, last.hash.clone()),
                head("node-a", last.sequence, wrong),
            ],
        })
        .await
        .expect("verify")
        .into_inner();
    assert!(reply.valid, "{reply:?}");
    assert_eq!(reply.node_id, "node-a");
    // A single-node engine has no peers: nothing witnessed.
    assert!(reply.witnessed_heads.is_empty());
    let outcomes: Vec<(pb::WitnessOutcome, u64)> = reply
        .witness_checks
        .iter()
        .map(|c| (c.outcome(), c.log_end))
        .collect();
    // The log grew by the listing and this call: it ends past `last`.
    let log_end = reply.witness_checks[1].log_end;
    assert!(log_end > last.sequence && log_end < last.sequence + 1000);
    assert_eq!(
        outcomes,
        vec![
            (pb::WitnessOutcome::Matches, 0),
            (pb::WitnessOutcome::LogEndsBefore, log_end),
            (pb::WitnessOutcome::HashMismatch, 0),
        ]
    );
    assert_eq!(reply.witness_checks[2].found_hash, last.hash);

    // Heads of another node, or malformed ones, are refused (and audited).
    for bad in [
        head("node-b", 1, vec![0; 32]),
        head("node-a", 0, vec![0; 32]),
        head("node-a", 1, vec![0; 31]),
        head("node a", 1, vec![0; 32]),
    ] {
        let status = server
            .audit()
            .verify_audit_log(pb::VerifyAuditLogRequest {
                witnessed_for_node: vec![bad.clone()],
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
    }
    server.stop().await;

    // A single node has no id, witnesses nothing and can be witnessed by nobody.
    let env = TestEnv::new();
    let (single, _) = node(&env, None).await;
    create_key(&single, "single").await;
    let (events, node_id) = all_events(&single).await;
    assert_eq!(node_id, "");
    assert!(
        events
            .iter()
            .all(|e| e.witnessed_heads.is_empty() && e.operation() != pb::Operation::AuditWitness)
    );
    let reply = single
        .audit()
        .verify_audit_log(pb::VerifyAuditLogRequest::default())
        .await
        .expect("verify")
        .into_inner();
    assert!(reply.valid);
    assert_eq!(reply.node_id, "");
    assert!(reply.witnessed_heads.is_empty() && reply.witness_checks.is_empty());
    let status = single
        .audit()
        .verify_audit_log(pb::VerifyAuditLogRequest {
            witnessed_for_node: vec![head("node-a", 1, events[0].hash.clone())],
        })
        .await
        .expect_err("a single node has no id");
    assert_eq!(status.code(), Code::InvalidArgument);
    single.stop().await;
}

// Multi-threaded: the CLI is a child process the test waits for while the
// in-process servers answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_verifies_and_lists_several_nodes() {
    let (env_a, env_b, env_single) = (TestEnv::new(), TestEnv::new(), TestEnv::new());
    let (a, _etcd_a) = node(&env_a, Some("node-a")).await;
    let (b, _etcd_b) = node(&env_b, Some("node-b")).await;
    let (single, _) = node(&env_single, None).await;
    create_key(&a, "on a").await;
    create_key(&b, "on b").await;
    create_key(&a, "on a again").await;
    let endpoints = format!("{},{}", a.endpoint.clone(), b.endpoint.clone());

    let (ok, out, err) = run_cli(
        &a.endpoint.clone(),
        &["audit", "verify", "--cluster", "--endpoints", &endpoints],
        b"",
    );
    let out = String::from_utf8_lossy(&out);
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("Cluster audit log  VALID\n"), "{out}");
    assert!(out.contains("node-a") && out.contains("node-b"), "{out}");

    let (ok, out, err) = run_cli(
        &a.endpoint.clone(),
        &[
            "--json",
            "audit",
            "verify",
            "--cluster",
            "--endpoints",
            &endpoints,
        ],
        b"",
    );
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(report["valid"], true);
    assert_eq!(report["nodes"][1]["node_id"], "node-b");
    assert_eq!(report["problems"], serde_json::json!([]));

    // A node without an id cannot be part of a cluster verification.
    let with_single = format!("{endpoints},{}", single.endpoint.clone());
    let (ok, out, err) = run_cli(
        &a.endpoint.clone(),
        &["audit", "verify", "--cluster", "--endpoints", &with_single],
        b"",
    );
    assert!(!ok);
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("Cluster audit log  INVALID\n"), "{out}");
    assert!(err.contains("has no [cluster] node_id"), "{err}");
    // --endpoints without --cluster is refused by the parser.
    let (ok, _, _) = run_cli(
        &a.endpoint.clone(),
        &["audit", "verify", "--endpoints", &endpoints],
        b"",
    );
    assert!(!ok);

    let (ok, out, err) = run_cli(
        &a.endpoint.clone(),
        &[
            "--json",
            "audit",
            "list",
            "--endpoints",
            &endpoints,
            "--operation",
            "CreateKey",
        ],
        b"",
    );
    assert!(ok, "{err}");
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out).expect("json");
    let nodes: Vec<&str> = listed
        .iter()
        .map(|e| e["node"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(nodes, vec!["node-a", "node-b", "node-a"], "merged by time");
    let times: Vec<&str> = listed
        .iter()
        .map(|e| e["time"].as_str().unwrap_or(""))
        .collect();
    let mut sorted = times.clone();
    sorted.sort_unstable();
    assert_eq!(times, sorted);

    let (ok, out, err) = run_cli(
        &a.endpoint.clone(),
        &["audit", "list", "--endpoints", &endpoints],
        b"",
    );
    assert!(ok, "{err}");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("NODE    SEQ"), "{out}");
    for server in [a, b, single] {
        server.stop().await;
    }
}

/// Events of `operation` on node `i` of `nodes`.
async fn events_of(
    nodes: &ClusterNodes,
    i: usize,
    operation: pb::Operation,
) -> Vec<pb::AuditEvent> {
    AuditClient::new(nodes.channel(i))
        .list_audit_events(pb::ListAuditEventsRequest {
            operation: operation as i32,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_audit_log_was_truncated_is_named_by_verify_cluster() {
    let etcd = EtcdCluster::start(3);
    // Checkpoints every 2 s (the harness's audit settings): heads are
    // published and witnessed without many requests.
    let mut nodes = ClusterNodes::new(3, Some(&etcd.client_settings()), Duration::from_secs(2));
    nodes.start_all();
    nodes.wait_all_serving().await;
    let endpoints: Vec<String> = (0..3).map(|i| nodes.endpoint(i)).collect();
    let endpoints = endpoints.join(",");

    // Requests on every node until every node's log holds a witness event
    // naming both others (each node checkpoints, publishes, reads).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for i in 0..3 {
            KeyManagementClient::new(nodes.channel(i))
                .create_key(pb::CreateKeyRequest::default())
                .await
                .expect("CreateKey");
        }
        let mut complete = true;
        for i in 0..3 {
            let witnessed: std::collections::BTreeSet<String> =
                events_of(&nodes, i, pb::Operation::AuditWitness)
                    .await
                    .iter()
                    .flat_map(|e| e.witnessed_heads.iter().map(|h| h.node.clone()))
                    .collect();
            complete &= witnessed.len() == 2 && !witnessed.contains(nodes.node(i).id());
        }
        if complete {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nodes did not witness each other"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (ok, out, err) = run_cli(
        &nodes.endpoint(0),
        &["audit", "verify", "--cluster", "--endpoints", &endpoints],
        b"",
    );
    assert!(ok, "{}{err}", String::from_utf8_lossy(&out));

    // The highest head of node-2 that another node witnessed.
    let mut witnessed_for_2 = 0;
    for i in [0, 2] {
        for e in events_of(&nodes, i, pb::Operation::AuditWitness).await {
            for h in e.witnessed_heads.iter().filter(|h| h.node == "node-2") {
                witnessed_for_2 = witnessed_for_2.max(h.sequence);
            }
        }
    }
    assert!(witnessed_for_2 > 1);

    // Stop node-2 and erase its log from below that head on (records and
    // checkpoints, so that its own chain still verifies).
    nodes.stop(1);
    let erased = kms_storage::testing::truncate_audit_log(
        &nodes.node(1).dir().join("data"),
        witnessed_for_2 - 2,
    )
    .expect("truncate node-2's audit log");
    assert!(erased >= 2);
    nodes.start(1);
    nodes.wait_serving(1).await;

    let (ok, out, err) = run_cli(
        &nodes.endpoint(0),
        &["audit", "verify", "--cluster", "--endpoints", &endpoints],
        b"",
    );
    let out = String::from_utf8_lossy(&out);
    assert!(!ok, "{out}");
    assert!(out.starts_with("Cluster audit log  INVALID\n"), "{out}");
    // Named by node and sequence: the log ends before the witnessed head,
    // or, if node-2 has written that far again since its restart, the event
    // there is not the one witnessed.
    assert!(
        err.contains("node node-2: log ends at sequence ")
            && err.contains(&format!("before sequence {witnessed_for_2} witnessed by"))
            || err.contains(&format!("node node-2: event {witnessed_for_2} has hash")),
        "{err}"
    );
    drop(etcd);
}
