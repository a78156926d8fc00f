//! The resumable re-encrypt job (issue 18, item 4): `kms re-encrypt` killed
//! with SIGKILL at random points, and its server restarted once mid-run,
//! still writes exactly one output line per input line, in order, each
//! decrypting under the key's new primary version; a resume refuses another
//! input or another destination.

use std::io::{BufReader, Read};
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use kms_client::reencrypt::JobError;
use kms_client::{ClientConfig, KmsClient, ReEncryptJob};
use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_tests::{DevServerProcess, TestEnv, kms_binary};
use tonic::transport::Channel;

use super::create_key;

const LINES: usize = 2000;

fn plaintext(i: usize) -> Vec<u8> {
    format!("line-{i}").into_bytes()
}

/// Even lines: JSON with a context and an extra field; odd: bare base64.
fn context_of(i: usize) -> Vec<(String, String)> {
    if i.is_multiple_of(2) {
        vec![("n".to_owned(), i.to_string())]
    } else {
        Vec::new()
    }
}

async fn make_input(crypto: &mut CryptoClient<Channel>, key: &str, lines: usize) -> String {
    let mut text = String::new();
    for start in (0..lines).step_by(1000) {
        let end = (start + 1000).min(lines);
        let results = crypto
            .batch_encrypt(pb::BatchEncryptRequest {
                key_id: key.to_owned(),
                entries: (start..end)
                    .map(|i| pb::BatchEncryptEntry {
                        plaintext: plaintext(i),
                        encryption_context: context_of(i).into_iter().collect(),
                    })
                    .collect(),
            })
            .await
            .expect("batch encrypt")
            .into_inner()
            .results;
        for (offset, result) in results.into_iter().enumerate() {
            let i = start + offset;
            let Some(pb::batch_encrypt_result::Outcome::Result(r)) = result.outcome else {
                panic!("encrypt {i} failed");
            };
            let blob = BASE64.encode(&r.ciphertext_blob);
            if i.is_multiple_of(2) {
                let context: serde_json::Map<String, serde_json::Value> = context_of(i)
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect();
                text.push_str(
                    &serde_json::json!({"id": i, "ciphertext_blob": blob, "encryption_context": context})
                        .to_string(),
                );
            } else {
                text.push_str(&blob);
            }
            text.push('\n');
        }
    }
    text
}

/// Checks the output: one line per input line, same form, each decrypting
/// to its plaintext under `key` version `version`.
async fn check_output(
    crypto: &mut CryptoClient<Channel>,
    output: &Path,
    key: &str,
    version: u32,
    lines: usize,
) {
    let text = std::fs::read_to_string(output).expect("output");
    let out: Vec<&str> = text.lines().collect();
    assert_eq!(out.len(), lines, "one output line per input line");
    assert!(text.ends_with('\n'));
    let mut entries = Vec::new();
    for (i, line) in out.iter().enumerate() {
        let blob = if i.is_multiple_of(2) {
            let json: serde_json::Value = serde_json::from_str(line).expect("JSON line");
            assert_eq!(json["id"], i, "line {i} kept its other fields, in order");
            assert_eq!(json["encryption_context"]["n"], i.to_string());
            json["ciphertext_blob"].as_str().expect("blob").to_owned()
        } else {
            (*line).to_owned()
        };
        entries.push(pb::BatchDecryptEntry {
            ciphertext_blob: BASE64.decode(blob).expect("base64"),
            encryption_context: context_of(i).into_iter().collect(),
        });
    }
    for (chunk_index, chunk) in entries.chunks(1000).enumerate() {
        let results = crypto
            .batch_decrypt(pb::BatchDecryptRequest {
                key_id: String::new(),
                entries: chunk.to_vec(),
            })
            .await
            .expect("batch decrypt")
            .into_inner()
            .results;
        for (offset, result) in results.into_iter().enumerate() {
            let i = chunk_index * 1000 + offset;
            let Some(pb::batch_decrypt_result::Outcome::Result(r)) = result.outcome else {
                panic!("line {i} does not decrypt: {:?}", result.outcome);
            };
            assert_eq!(r.plaintext, plaintext(i), "line {i}");
            assert_eq!(
                (r.key_id.as_str(), r.key_version),
                (key, version),
                "line {i}"
            );
        }
    }
}

fn lines_done(checkpoint: &Path) -> u64 {
    std::fs::read(checkpoint)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|json| json["lines_done"].as_u64())
        .unwrap_or(0)
}

/// A dev server on `data` with one key whose `lines` blobs (the
/// [`make_input`] form) are written to `input`, then the key rotated so
/// that its version 2 is where a job moves them. Returns the server, the
/// key id and a Crypto client on it.
async fn server_with_blobs(
    data: &Path,
    input: &Path,
    lines: usize,
) -> (DevServerProcess, String, CryptoClient<Channel>) {
    let server = DevServerProcess::start(data);
    let channel = Channel::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut keys = KeyManagementClient::new(channel.clone());
    let mut crypto = CryptoClient::new(channel);
    let key = keys
        .create_key(pb::CreateKeyRequest::default())
        .await
        .expect("create")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id;
    std::fs::write(input, make_input(&mut crypto, &key, lines).await).expect("input");
    keys.rotate_key(pb::RotateKeyRequest {
        key_id: key.clone(),
    })
    .await
    .expect("rotate to version 2");
    (server, key, crypto)
}

/// A small xorshift generator: random kill points, reproducible from the
/// printed seed.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_re_encrypt_command_survives_sigkills_and_a_server_restart() {
    let data = tempfile::tempdir().expect("data dir");
    let work = tempfile::tempdir().expect("work dir");
    let input = work.path().join("blobs.jsonl");
    let output = work.path().join("moved.jsonl");
    let checkpoint = work.path().join("moved.jsonl.checkpoint");
    let (server, key, _) = server_with_blobs(data.path(), &input, LINES).await;
    let addr = server.addr;
    let endpoint = server.endpoint();

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    eprintln!("kill schedule seed {seed}");
    let (in_path, out_path, cp) = (input.clone(), output.clone(), checkpoint.clone());
    let ep = endpoint.clone();
    let data_path = data.path().to_owned();
    let (server, kills, summary) = tokio::task::spawn_blocking(move || {
        let mut random = Random(seed);
        let mut server = server;
        let run = || {
            std::process::Command::new(kms_binary())
                .args([
                    "--endpoint",
                    &ep,
                    "--json",
                    "re-encrypt",
                    "--batch-size",
                    "20",
                ])
                .arg("--in")
                .arg(&in_path)
                .arg("--out")
                .arg(&out_path)
                .env("KMS_LOG", "error")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn kms re-encrypt")
        };
        // 20 kill points at random progress (input lines done), each hit
        // after a further random 0-40 ms so that kills land in every phase
        // (RPC in flight, output written, checkpoint being replaced); at the
        // 9th the server is killed and restarted instead.
        let mut points: Vec<u64> = (0..20)
            .map(|_| 1 + random.below(LINES as u64 - 40))
            .collect();
        points.sort_unstable();
        let mut kills = 0;
        let mut child = run();
        for (index, point) in points.into_iter().enumerate() {
            while lines_done(&cp) < point && child.try_wait().expect("try_wait").is_none() {
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(random.below(40)));
            if child.try_wait().expect("try_wait").is_some() {
                break;
            }
            if index == 8 {
                // The server dies under the running job and comes back on
                // the same address; the job waits and carries on.
                let before = lines_done(&cp);
                server.kill();
                std::thread::sleep(Duration::from_millis(500));
                server = DevServerProcess::start_at(&data_path, addr);
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while lines_done(&cp) <= before
                    && child.try_wait().expect("try_wait").is_none()
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                // Progress, or the job went on to its end (which removes
                // the checkpoint) when the restart came near it.
                let progressed = lines_done(&cp) > before;
                let finished = child
                    .try_wait()
                    .expect("try_wait")
                    .is_some_and(|status| status.success());
                if !(progressed || finished) {
                    let detail = if child.try_wait().expect("try_wait").is_some() {
                        let out = child.wait_with_output().expect("output");
                        format!("it exited: {}", String::from_utf8_lossy(&out.stderr))
                    } else {
                        "it is still running".to_owned()
                    };
                    panic!("the job made no progress after the server restart; {detail}");
                }
                continue;
            }
            child.kill().expect("SIGKILL");
            if child.wait().expect("reap").success() {
                // It reached its end just before the kill landed.
                break;
            }
            kills += 1;
            child = run();
        }
        // The last run goes to the end.
        let finished = child.wait_with_output().expect("wait");
        assert!(
            finished.status.success(),
            "{}",
            String::from_utf8_lossy(&finished.stderr)
        );
        let summary: serde_json::Value =
            serde_json::from_slice(&finished.stdout).expect("JSON summary");
        (server, kills, summary)
    })
    .await
    .expect("kill loop");
    eprintln!("killed {kills} times; summary {summary}");
    assert!(
        kills >= 15,
        "the job finished after only {kills} of 19 kills"
    );
    assert_eq!(summary["lines"], LINES);
    assert_eq!(summary["moved"], LINES);
    assert_eq!(summary["failed"], 0);
    assert!(!checkpoint.exists(), "the checkpoint is removed at the end");

    let channel = Channel::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect again");
    check_output(&mut CryptoClient::new(channel), &output, &key, 2, LINES).await;

    // A finished job is not run again over its output.
    let again = std::process::Command::new(kms_binary())
        .args(["--endpoint", &server.endpoint(), "re-encrypt"])
        .arg("--in")
        .arg(&input)
        .arg("--out")
        .arg(&output)
        .output()
        .expect("run again");
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no checkpoint"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    drop(server);
}

/// A reader that fails after `limit` bytes: an interruption at a known line.
struct BreaksAfter {
    inner: std::io::Cursor<Vec<u8>>,
    limit: u64,
}

impl Read for BreaksAfter {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.limit.saturating_sub(self.inner.position());
        if left == 0 {
            return Err(std::io::Error::other("interrupted"));
        }
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        self.inner.read(&mut buf[..n])
    }
}

#[tokio::test]
async fn a_resume_refuses_another_input_or_destination_and_finishes_the_same_one() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "job").await;
    let other = create_key(&server, "other").await;
    let text = make_input(&mut server.crypto(), &key, 300).await;
    server
        .keys()
        .rotate_key(pb::RotateKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("rotate");
    let work = tempfile::tempdir().expect("work dir");
    let output = work.path().join("out");
    let checkpoint = ReEncryptJob::default_checkpoint(&output);
    let client = KmsClient::connect(ClientConfig::new(server.endpoint.clone()))
        .await
        .expect("client");
    let job = ReEncryptJob::new(&output, &checkpoint).batch_size(25);

    // Interrupted in the middle of line 101: 100 lines are done (4 batches).
    let cut = text.match_indices('\n').nth(99).expect("100 lines").0 as u64 + 10;
    let broken = BufReader::new(BreaksAfter {
        inner: std::io::Cursor::new(text.clone().into_bytes()),
        limit: cut,
    });
    let error = job
        .run(&client, broken, |_| {})
        .await
        .expect_err("the input breaks");
    assert!(
        matches!(error, JobError::Input { line: 101, .. }),
        "{error:?}"
    );
    assert_eq!(lines_done(&checkpoint), 100);
    let written = std::fs::read_to_string(&output).expect("output");
    assert_eq!(written.lines().count(), 100);

    // Another input (one changed line among those done): refused, nothing written.
    let mut changed: Vec<String> = text.lines().map(str::to_owned).collect();
    changed.swap(3, 5);
    let changed = changed.join("\n") + "\n";
    let error = job
        .run(&client, changed.as_bytes(), |_| {})
        .await
        .expect_err("another input");
    assert!(
        matches!(error, JobError::InputChanged { lines: 100, .. }),
        "{error:?}"
    );
    // A shorter input is another input too.
    let head: String = text.lines().take(50).map(|l| format!("{l}\n")).collect();
    let error = job
        .run(&client, head.as_bytes(), |_| {})
        .await
        .expect_err("a shorter input");
    assert!(matches!(error, JobError::InputChanged { .. }), "{error:?}");
    // Another destination: refused.
    let error = ReEncryptJob::new(&output, &checkpoint)
        .destination_key(other)
        .run(&client, text.as_bytes(), |_| {})
        .await
        .expect_err("another destination");
    assert!(
        matches!(error, JobError::DestinationChanged { .. }),
        "{error:?}"
    );
    assert_eq!(std::fs::read_to_string(&output).expect("output"), written);

    // A crash after a batch's output was written but before its checkpoint:
    // the resume drops those bytes (the checkpoint counts what is valid).
    let mut torn = written.clone();
    torn.push_str(text.lines().nth(100).expect("line 101"));
    torn.push_str("\npartial lin");
    std::fs::write(&output, &torn).expect("torn output");

    // The same input: resumes at line 101 and finishes.
    let mut seen = Vec::new();
    let summary = job
        .run(&client, text.as_bytes(), |p| seen.push(p.lines_done))
        .await
        .expect("resume");
    assert_eq!(summary.resumed_from, 100);
    assert_eq!(
        (summary.lines, summary.moved, summary.failed),
        (300, 300, 0)
    );
    assert_eq!(seen.first(), Some(&100));
    assert_eq!(seen.last(), Some(&300));
    assert!(
        std::fs::read_to_string(&output)
            .expect("out")
            .starts_with(&written)
    );
    check_output(&mut server.crypto(), &output, &key, 2, 300).await;

    // Run again over its own output: every blob is already current, and
    // a bad line is copied unchanged and reported.
    let second = work.path().join("second");
    let mut moved_text = std::fs::read_to_string(&output).expect("out");
    moved_text.push_str("not-base64!\n\n");
    let summary = ReEncryptJob::new(&second, ReEncryptJob::default_checkpoint(&second))
        .run(&client, moved_text.as_bytes(), |_| {})
        .await
        .expect("second run");
    assert_eq!(
        (
            summary.lines,
            summary.already_current,
            summary.moved,
            summary.failed,
            summary.blank
        ),
        (302, 300, 0, 1, 1)
    );
    assert_eq!(summary.failures[0].line, 301);
    assert_eq!(summary.failures[0].code, "MALFORMED_LINE");
    assert_eq!(
        std::fs::read_to_string(&second).expect("second"),
        moved_text
    );
    server.stop().await;
}

/// Ctrl-C (SIGINT) stops the command with a message that says how many
/// lines are safe and how to resume; running it again finishes the job.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_with_a_resume_message_and_the_rerun_finishes() {
    const CTRL_C_LINES: usize = 2000;
    let data = tempfile::tempdir().expect("data dir");
    let work = tempfile::tempdir().expect("work dir");
    let input = work.path().join("blobs.jsonl");
    let output = work.path().join("moved.jsonl");
    let checkpoint = work.path().join("moved.jsonl.checkpoint");
    let (server, key, mut crypto) = server_with_blobs(data.path(), &input, CTRL_C_LINES).await;
    let endpoint = server.endpoint();

    let run = {
        let (ep, input, output) = (endpoint.clone(), input.clone(), output.clone());
        move || {
            std::process::Command::new(kms_binary())
                .args([
                    "--endpoint",
                    &ep,
                    "--json",
                    "re-encrypt",
                    "--batch-size",
                    "5",
                ])
                .arg("--in")
                .arg(&input)
                .arg("--out")
                .arg(&output)
                .env("KMS_LOG", "error")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn kms re-encrypt")
        }
    };
    let cp = checkpoint.clone();
    let stopped = tokio::task::spawn_blocking(move || {
        let child = run();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while lines_done(&cp) < 50 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let sent = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .expect("kill -INT");
        assert!(sent.success());
        let out = child.wait_with_output().expect("wait");
        (out, lines_done(&cp))
    })
    .await
    .expect("join");
    let (out, done) = stopped;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an interrupted run is not a success");
    assert!(
        done > 0 && done < CTRL_C_LINES as u64,
        "interrupted mid-run: {done} lines checkpointed"
    );
    assert!(
        stderr.contains(&format!(
            "interrupted: {done} lines are done and checkpointed"
        )) && stderr.contains("run the same command again to resume"),
        "{stderr}"
    );

    // The same command again finishes: every line once, in order.
    let rerun = tokio::task::spawn_blocking({
        let (ep, input, output) = (endpoint.clone(), input.clone(), output.clone());
        move || {
            std::process::Command::new(kms_binary())
                .args(["--endpoint", &ep, "--json", "re-encrypt"])
                .arg("--in")
                .arg(&input)
                .arg("--out")
                .arg(&output)
                .env("KMS_LOG", "error")
                .output()
                .expect("rerun")
        }
    })
    .await
    .expect("join");
    assert!(
        rerun.status.success(),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&rerun.stdout).expect("summary");
    assert_eq!(summary["resumed_from"], done, "{summary}");
    assert_eq!(summary["lines"], CTRL_C_LINES);
    assert!(!checkpoint.exists());
    check_output(&mut crypto, &output, &key, 2, CTRL_C_LINES).await;
    drop(server);
}

/// A destination that does not exist or is disabled is refused before any
/// line is sent: no output, no checkpoint, no per-line refusals.
#[tokio::test]
async fn a_missing_or_disabled_destination_is_refused_before_any_line() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "source").await;
    let disabled = create_key(&server, "disabled destination").await;
    server
        .keys()
        .disable_key(pb::DisableKeyRequest {
            key_id: disabled.clone(),
        })
        .await
        .expect("disable");
    let work = tempfile::tempdir().expect("work dir");
    let input = work.path().join("in.jsonl");
    std::fs::write(&input, make_input(&mut server.crypto(), &key, 10).await).expect("input");
    let output = work.path().join("out.jsonl");
    for (destination, expected) in [
        ("alias/nowhere", "no destination key alias/nowhere"),
        (disabled.as_str(), "is DISABLED, not ENABLED"),
    ] {
        let endpoint = server.endpoint.clone();
        let args: Vec<String> = [
            "re-encrypt",
            "--in",
            input.to_str().expect("utf-8"),
            "--out",
            output.to_str().expect("utf-8"),
            "--destination-key",
            destination,
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        let (ok, _, stderr) = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            kms_tests::run_cli(&endpoint, &refs, b"")
        })
        .await
        .expect("join");
        assert!(!ok, "{destination}");
        assert!(
            stderr.contains(expected) && stderr.contains("nothing was changed"),
            "{stderr}"
        );
        assert!(!output.exists(), "no output for {destination}");
        assert!(!ReEncryptJob::default_checkpoint(&output).exists());
    }
    let refused = server
        .audit()
        .list_audit_events(pb::ListAuditEventsRequest {
            operation: pb::Operation::BatchReEncrypt as i32,
            ..Default::default()
        })
        .await
        .expect("audit")
        .into_inner()
        .events;
    assert!(refused.is_empty(), "no line was sent: {refused:?}");
    server.stop().await;
}

/// Started while its server is down (restarting), the command waits for it
/// (saying so once) instead of failing, and then does the whole job.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_started_while_the_server_is_down_waits_for_it() {
    const LINES_DOWN: usize = 50;
    let data = tempfile::tempdir().expect("data dir");
    let work = tempfile::tempdir().expect("work dir");
    let input = work.path().join("blobs.jsonl");
    let output = work.path().join("moved.jsonl");
    let (server, key, _) = server_with_blobs(data.path(), &input, LINES_DOWN).await;
    let addr = server.addr;
    let endpoint = server.endpoint();
    server.kill();

    let (ep, in_path, out_path) = (endpoint.clone(), input.clone(), output.clone());
    let data_path = data.path().to_owned();
    let (out, server) = tokio::task::spawn_blocking(move || {
        let child = std::process::Command::new(kms_binary())
            .args(["--endpoint", &ep, "--json", "re-encrypt"])
            .arg("--in")
            .arg(&in_path)
            .arg("--out")
            .arg(&out_path)
            .env("KMS_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn kms re-encrypt");
        std::thread::sleep(Duration::from_millis(1500));
        let server = DevServerProcess::start_at(&data_path, addr);
        (child.wait_with_output().expect("wait"), server)
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot connect to") && stderr.contains("--unavailable-patience"),
        "it said it was waiting: {stderr}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary");
    assert_eq!(summary["moved"], LINES_DOWN, "{summary}");
    let channel = Channel::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect again");
    check_output(
        &mut CryptoClient::new(channel),
        &output,
        &key,
        2,
        LINES_DOWN,
    )
    .await;
    drop(server);
}
