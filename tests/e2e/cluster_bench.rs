//! `kms-bench cluster` end to end (issue 15 item 6): a very short run
//! against a real cluster (three etcd members, three `kms` nodes) and a
//! single node, both started by the test harness. It must exit 0 and report
//! figures (calls counted, none failed) for every operation on both
//! targets. Nothing here looks at the figures themselves: timings are for
//! benchmarks, not assertions.
//!
//! The `kms-bench` binary is the one the workspace build put next to `kms`
//! (`cargo nextest run --workspace` builds both).

use std::process::Command;
use std::time::Duration;

use kms_tests::cluster::EtcdCluster;
use kms_tests::cluster_nodes::ClusterNodes;

/// Δ (`staleness_bound_ms`) of every cluster node.
const DELTA: Duration = Duration::from_secs(2);

/// The rows `kms-bench cluster` measures, in table order.
const ROWS: [&str; 4] = [
    "Encrypt 32B",
    "Decrypt 32B",
    "GenerateDataKey AES-256",
    "CreateKey",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_bench_cluster_reports_every_operation_on_both_targets() {
    let etcd = EtcdCluster::start(3);
    let mut cluster = ClusterNodes::new(3, Some(&etcd.client_settings()), DELTA);
    cluster.start_all();
    cluster.wait_all_serving().await;
    let mut single = ClusterNodes::new(1, None, DELTA);
    single.start_all();
    single.wait_all_serving().await;

    let bench = kms_tests::kms_binary().with_file_name("kms-bench");
    assert!(
        bench.is_file(),
        "{} not found: build the workspace first",
        bench.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("cluster.json");
    let endpoints: Vec<String> = (0..cluster.len()).map(|i| cluster.endpoint(i)).collect();
    // A few seconds of load in all: 4 rows × 2 targets × (0.3 + 0.05) s.
    let output = tokio::task::spawn_blocking({
        let json = json.clone();
        let single = single.endpoint(0);
        move || {
            Command::new(bench)
                .args([
                    "cluster",
                    "--quick",
                    "--duration",
                    "0.3",
                    "--warmup",
                    "0.05",
                ])
                .arg("--endpoints")
                .arg(endpoints.join(","))
                .arg("--single")
                .arg(single)
                .arg("--json")
                .arg(&json)
                .output()
                .expect("run kms-bench cluster")
        }
    })
    .await
    .expect("kms-bench task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "kms-bench cluster failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for row in ROWS {
        assert!(stdout.contains(row), "no {row} line in:\n{stdout}");
    }

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
            .expect("valid JSON");
    assert_eq!(
        report["cluster_endpoints"].as_array().map(Vec::len),
        Some(3),
        "{report:#}"
    );
    for target in ["single", "cluster"] {
        let rows = report[target].as_array().expect("rows");
        for name in ROWS {
            let row = rows
                .iter()
                .find(|r| r["name"] == name)
                .unwrap_or_else(|| panic!("no {target} row {name} in {rows:#?}"));
            assert!(row["calls"].as_u64().is_some_and(|n| n > 0), "{row:#}");
            assert_eq!(row["errors"].as_u64(), Some(0), "{row:#}");
            assert!(
                row["items_per_sec"].as_f64().is_some_and(|v| v > 0.0),
                "{row:#}"
            );
        }
    }
    let pairs = report["pairs"].as_array().expect("pairs");
    for name in ROWS {
        let pair = pairs
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no pair {name} in {pairs:#?}"));
        assert!(pair["ops_ratio"].as_f64().is_some(), "{pair:#}");
    }
    drop(single);
    drop(cluster);
    drop(etcd);
}
