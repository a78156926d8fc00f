//! The emergency path of issue 18 (item 5), end to end and from the CLI as
//! the README "Operations → A version is suspected compromised" tells an
//! operator: rotate → disable the old version (new requests fail at once) →
//! re-encrypt-only (Decrypt still refused, ReEncrypt allowed) → `kms
//! re-encrypt` moves every blob → `kms key last-usage` confirms nothing used
//! it since → schedule destruction (the guard refuses: the re-encryption
//! itself was a decrypt-side use; the override passes and is audited as
//! such) → the scheduler destroys it → its blobs fail by name, the moved
//! ones decrypt, and every step is in a verified audit log.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use kms_proto::v1 as pb;
use kms_tests::{TestEnv, TestServer, run_cli};
use tonic::Code;

use super::{create_key, ctx, decrypt, encrypt};

/// Blobs under the suspect version.
const SUSPECT_BLOBS: usize = 300;
/// Blobs of another key, already under its primary: the job leaves them.
const OTHER_BLOBS: usize = 20;
const DAY_MS: u64 = 86_400_000;

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms")
}

/// Runs the `kms` CLI against `server` with `--json`; panics with its
/// stderr unless it succeeds when `expect_ok`, and returns (ok, stdout
/// parsed as JSON or Null, stderr).
async fn cli(
    server: &TestServer,
    args: &[&str],
    expect_ok: bool,
) -> (bool, serde_json::Value, String) {
    let endpoint = server.endpoint.clone();
    let mut all = vec!["--json".to_owned()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run_cli(&endpoint, &refs, b"")
    })
    .await
    .expect("join");
    if expect_ok {
        assert!(ok, "kms {args:?} failed: {stderr}");
    }
    let json = serde_json::from_slice(&stdout).unwrap_or(serde_json::Value::Null);
    (ok, json, stderr)
}

fn plaintext(i: usize) -> Vec<u8> {
    format!("record {i}: card ending {:04}", i * 7 % 10_000).into_bytes()
}

fn tenant(i: usize) -> String {
    format!("t{}", i % 3)
}

/// The input file of `kms re-encrypt`: JSON lines with a context.
fn write_input(path: &Path, blobs: &[(Vec<u8>, String)]) {
    let mut text = String::new();
    for (blob, tenant) in blobs {
        text.push_str(
            &serde_json::json!({
                "ciphertext_blob": BASE64.encode(blob),
                "encryption_context": {"tenant": tenant},
            })
            .to_string(),
        );
        text.push('\n');
    }
    std::fs::write(path, text).expect("write input");
}

fn read_output(path: &Path) -> Vec<Vec<u8>> {
    std::fs::read_to_string(path)
        .expect("output")
        .lines()
        .map(|line| {
            let json: serde_json::Value = serde_json::from_str(line).expect("JSON line");
            BASE64
                .decode(json["ciphertext_blob"].as_str().expect("blob"))
                .expect("base64")
        })
        .collect()
}

/// Version `version`'s (decrypt count, last decrypt time in ms) by `kms key
/// last-usage KEY --version N --json`.
async fn decrypt_use(server: &TestServer, key: &str, version: u32) -> (u64, Option<u64>) {
    let n = version.to_string();
    let (_, json, _) = cli(server, &["key", "last-usage", key, "--version", &n], true).await;
    let usage = &json["versions"][0]["usage"];
    let count = usage["decrypt_count"].as_u64().expect("decrypt_count");
    let last = usage["last_decrypt_time"].as_str().map(|t| {
        let ts: prost_types::Timestamp = t.parse().expect("RFC 3339");
        u64::try_from(ts.seconds).expect("s") * 1000
            + u64::try_from(ts.nanos).expect("ns") / 1_000_000
    });
    (count, last)
}

fn refused_with(status: &tonic::Status, text: &str) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains(text), "{}", status.message());
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one operator story, step by step
async fn a_suspected_version_is_moved_off_and_destroyed_with_every_step_audited() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "payments").await;
    let other = create_key(&server, "reports").await;

    // Data under version 1 of `key`, plus some of another key.
    let mut blobs = Vec::new();
    for i in 0..SUSPECT_BLOBS {
        let t = tenant(i);
        let r = encrypt(&server, &key, &plaintext(i), &[("tenant", &t)]).await;
        assert_eq!(r.key_version, 1);
        blobs.push((r.ciphertext_blob, t));
    }
    for i in SUSPECT_BLOBS..SUSPECT_BLOBS + OTHER_BLOBS {
        let t = tenant(i);
        let r = encrypt(&server, &other, &plaintext(i), &[("tenant", &t)]).await;
        blobs.push((r.ciphertext_blob, t));
    }
    let (first, first_tenant) = blobs[0].clone();
    let first_ctx = [("tenant", first_tenant.as_str())];

    // 1. Suspected compromise: rotate, so new data goes to version 2.
    let (_, rotated, _) = cli(&server, &["key", "rotate", &key], true).await;
    assert_eq!(rotated["new_version"]["version"], 2, "{rotated}");

    // 2. Disable version 1: its blobs are refused at once.
    cli(&server, &["key", "disable-version", &key, "1"], true).await;
    let status = decrypt(&server, &first, &first_ctx)
        .await
        .expect_err("disabled version");
    refused_with(&status, "disabled");

    // 3. Re-encrypt only: Decrypt stays refused, ReEncrypt is allowed.
    let (_, state, _) = cli(
        &server,
        &["key", "re-encrypt-only-version", &key, "1"],
        true,
    )
    .await;
    assert_eq!(state["state"], "REENCRYPT_ONLY", "{state}");
    let status = decrypt(&server, &first, &first_ctx)
        .await
        .expect_err("re-encrypt-only version");
    refused_with(&status, "re-encrypt only");

    // 4. Move everything with the resumable job.
    let dir = tempfile::tempdir().expect("dir");
    let input = dir.path().join("blobs.jsonl");
    let output = dir.path().join("moved.jsonl");
    write_input(&input, &blobs);
    let started_ms = now_ms();
    let (_, summary, _) = cli(
        &server,
        &[
            "re-encrypt",
            "--in",
            input.to_str().expect("utf-8"),
            "--out",
            output.to_str().expect("utf-8"),
            "--batch-size",
            "64",
        ],
        true,
    )
    .await;
    let finished_ms = now_ms();
    assert_eq!(summary["lines"], SUSPECT_BLOBS + OTHER_BLOBS, "{summary}");
    assert_eq!(summary["moved"], SUSPECT_BLOBS, "{summary}");
    assert_eq!(summary["already_current"], OTHER_BLOBS, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");

    // Every moved blob decrypts under version 2, to the same plaintext.
    let moved = read_output(&output);
    assert_eq!(moved.len(), blobs.len());
    for (i, blob) in moved.iter().enumerate() {
        let t = tenant(i);
        let r = decrypt(&server, blob, &[("tenant", &t)])
            .await
            .expect("moved blob decrypts");
        assert_eq!(r.plaintext, plaintext(i), "line {i}");
        if i < SUSPECT_BLOBS {
            assert_eq!((r.key_id.as_str(), r.key_version), (key.as_str(), 2));
        } else {
            assert_eq!(blob, &blobs[i].0, "already current: unchanged");
        }
    }

    // The other key's blobs were only read (by the job, then by the check
    // above): two decrypt-side uses each, and no encrypt-side use beyond
    // their original Encrypt (an already-current item encrypts nothing).
    let (_, other_use, _) = cli(&server, &["key", "last-usage", &other], true).await;
    assert_eq!(
        other_use["usage"]["encrypt_count"], OTHER_BLOBS,
        "{other_use}"
    );
    assert_eq!(
        other_use["usage"]["decrypt_count"],
        2 * OTHER_BLOBS,
        "{other_use}"
    );

    // 5. "Does anything still use version 1?" Its decrypt-side uses are
    // exactly the job's re-encryptions, the last within the job's run; the
    // refused Decrypts above were not uses. A later attempt is refused and
    // changes nothing.
    let (_, shown, _) = cli(
        &server,
        &["key", "last-usage", &key, "--version", "1"],
        true,
    )
    .await;
    assert_eq!(shown["versions"][0]["state"], "REENCRYPT_ONLY", "{shown}");
    let (count, last) = decrypt_use(&server, &key, 1).await;
    assert_eq!(count, SUSPECT_BLOBS as u64, "one use per moved blob");
    let last = last.expect("last decrypt time");
    assert!(
        (started_ms.saturating_sub(1000)..=finished_ms + 1000).contains(&last),
        "last use {last} within the job ({started_ms}..{finished_ms})"
    );
    decrypt(&server, &first, &first_ctx)
        .await
        .expect_err("still refused");
    assert_eq!(decrypt_use(&server, &key, 1).await, (count, Some(last)));

    // 6. Schedule destruction. The guard refuses (the re-encryption was a
    // use within the quiet period) and says when; the operator, having
    // confirmed step 5, overrides, which is audited under its own name.
    let (ok, _, stderr) = cli(
        &server,
        &[
            "key",
            "schedule-version-destruction",
            &key,
            "1",
            "--days",
            "1",
        ],
        false,
    )
    .await;
    assert!(!ok, "the guard refuses");
    assert!(
        stderr.contains("was last used to decrypt at 20"),
        "the refusal names the last use: {stderr}"
    );
    let (_, scheduled, _) = cli(
        &server,
        &[
            "key",
            "schedule-version-destruction",
            &key,
            "1",
            "--days",
            "1",
            "--override-recent-use",
        ],
        true,
    )
    .await;
    assert_eq!(scheduled["state"], "SCHEDULED_DESTRUCTION", "{scheduled}");

    // 7. The window passes; the scheduler destroys the KEK in the HSM.
    let kek = kms_hsm::ObjectId::new(format!("{key}/v1").into_bytes()).expect("id");
    assert!(server.service().hsm().key_exists(&kek).expect("search"));
    let pass = server
        .service()
        .run_scheduler_pass_at(now_ms() + 2 * DAY_MS);
    assert_eq!((pass.versions_destroyed, pass.failed), (1, 0), "{pass:?}");
    assert!(
        !server.service().hsm().key_exists(&kek).expect("search"),
        "the KEK is gone from the token"
    );
    let (_, versions, _) = cli(&server, &["key", "versions", &key], true).await;
    let states: Vec<(u64, &str)> = versions
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().expect("n"),
                v["state"].as_str().expect("state"),
            )
        })
        .collect();
    assert_eq!(states, [(1, "DESTROYED"), (2, "ENABLED")], "{versions}");

    // Old blobs fail by name, never as "invalid ciphertext"; moved ones work.
    let status = decrypt(&server, &first, &first_ctx)
        .await
        .expect_err("destroyed");
    refused_with(
        &status,
        &format!("key version 1 of key {key} was destroyed"),
    );
    let status = server
        .crypto()
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: first.clone(),
            source_encryption_context: ctx(&first_ctx),
            destination_key_id: key.clone(),
            destination_encryption_context: ctx(&first_ctx),
            ..Default::default()
        })
        .await
        .expect_err("re-encrypt from destroyed");
    refused_with(&status, "was destroyed");
    let r = decrypt(&server, &moved[0], &first_ctx)
        .await
        .expect("moved");
    assert_eq!(r.plaintext, plaintext(0));

    // 8. Every step is in the audit log, in order, and the log verifies.
    let (_, events, _) = cli(&server, &["audit", "list", "--key", &key], true).await;
    let steps: Vec<(String, u64, String)> = events
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["operation"].as_str().expect("operation").to_owned(),
                e["key_version"].as_u64().unwrap_or(0),
                e["result"].as_str().unwrap_or("").to_owned(),
            )
        })
        .filter(|(op, _, _)| {
            !matches!(
                op.as_str(),
                "Encrypt"
                    | "Decrypt"
                    | "ReEncrypt"
                    | "BatchReEncrypt"
                    | "GetKeyLastUsage"
                    | "ListKeyVersions"
            )
        })
        .collect();
    let expected: Vec<(String, u64, String)> = [
        ("CreateKey", 1, "OK"),
        ("RotateKey", 2, "OK"),
        ("DisableKeyVersion", 1, "OK"),
        ("SetKeyVersionReEncryptOnly", 1, "OK"),
        ("ScheduleKeyVersionDestruction", 1, "FAILED_PRECONDITION"),
        ("ScheduleKeyVersionDestructionOverrideRecentUse", 1, "OK"),
        ("DestroyKeyVersion", 1, "OK"),
    ]
    .iter()
    .map(|(op, v, r)| ((*op).to_owned(), *v, (*r).to_owned()))
    .collect();
    assert_eq!(steps, expected);
    let moves = events
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["operation"] == "BatchReEncrypt" && e["key_version"] == 1)
        .count();
    assert_eq!(moves, SUSPECT_BLOBS, "one source record per moved blob");
    let (_, verified, _) = cli(&server, &["audit", "verify"], true).await;
    assert_eq!(verified["valid"], true, "{verified}");
}
