//! CI's proof that `kms-bench run` still works end to end: a --quick run
//! against a fresh `kms serve --dev` child must produce every row with calls
//! counted and none failed. Nothing here looks at the figures themselves:
//! timings are for benchmarks, not assertions.
//!
//! This lives in the bench package (not in tests/) so that cargo builds the
//! kms-bench binary it runs (CARGO_BIN_EXE_*); the `kms` binary next to it
//! comes from the same workspace build.

use std::process::Command;

#[test]
fn kms_bench_quick_run_reports_every_row_with_calls_and_no_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    let output = Command::new(env!("CARGO_BIN_EXE_kms-bench"))
        .args([
            "run",
            "--quick",
            // Long enough for a few 100-item batch calls of a debug build
            // on a busy machine to start and end inside the window.
            "--duration",
            "0.5",
            "--warmup",
            "0.05",
            "--dir",
        ])
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run kms-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "kms-bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("Targets (issue 5, part 3)"), "{stdout}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
            .expect("valid JSON");
    let rows = report["rows"].as_array().expect("rows");
    let mut expected: Vec<(String, Option<&str>, u64)> = Vec::new();
    for c in [1, 8] {
        for (name, audit) in [
            ("hsm-raw encrypt 32B", None),
            ("hsm-raw decrypt 32B", None),
            ("grpc-noop", Some("synced")),
            ("Encrypt 32B", Some("synced")),
            ("Encrypt 1KiB", Some("synced")),
            ("Encrypt 4KiB", Some("synced")),
            ("Decrypt 32B", Some("synced")),
            ("GenerateDataKey AES-256", Some("synced")),
            ("ReEncrypt 32B", Some("synced")),
            ("BatchEncrypt 100x32B", Some("synced")),
            ("BatchDecrypt 100x32B", Some("synced")),
            ("BatchGenerateDataKey 100xAES-256", Some("synced")),
        ] {
            expected.push((name.to_owned(), audit, c));
        }
    }
    for name in ["Encrypt 32B", "GenerateDataKey AES-256"] {
        expected.push((name.to_owned(), Some("unsynced"), 8));
    }
    for (name, audit, c) in &expected {
        let row = rows
            .iter()
            .find(|r| {
                r["name"] == name.as_str()
                    && r["audit"].as_str() == *audit
                    && r["concurrency"] == *c
            })
            .unwrap_or_else(|| panic!("no row {name} {audit:?} c={c} in {rows:#?}"));
        assert!(row["calls"].as_u64().is_some_and(|n| n > 0), "{row:#}");
        assert_eq!(row["runs_items_per_sec"].as_array().map(Vec::len), Some(1));
        assert!(
            row["items_per_sec"].as_f64().is_some_and(|v| v > 0.0),
            "{row:#}"
        );
        assert_eq!(row["errors"], 0, "{row:#}");
        if name.starts_with("Batch") {
            assert_eq!(
                row["items"].as_u64(),
                row["calls"].as_u64().map(|n| n * 100),
                "{row:#}"
            );
        }
    }
    assert_eq!(rows.len(), expected.len(), "unexpected extra rows");
    let service = rows
        .iter()
        .find(|r| r["name"] == "Encrypt 32B" && r["concurrency"] == 8)
        .expect("Encrypt row");
    assert!(service["vs_hsm_raw"].as_f64().is_some(), "{service:#}");
    assert!(service["vs_grpc_noop"].as_f64().is_some(), "{service:#}");
    assert_eq!(report["audit_sync"].as_array().map(Vec::len), Some(2));
    assert_eq!(report["targets"].as_array().map(Vec::len), Some(6));
    assert!(report["machine"]["nproc"].as_u64().is_some_and(|n| n >= 1));
}
