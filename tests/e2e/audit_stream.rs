//! Audit streaming for SIEMs (issue 13, item 9), against the real `kms`
//! process: `kms audit tail --follow` sees every record exactly once across
//! server restarts (graceful and SIGKILL), and `kms audit tail` without
//! --follow prints a sequence range as JSON lines.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use kms_proto::v1::audit_client::AuditClient;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_storage::AuditFilter;
use kms_tests::{DevServerProcess, TestEnv, kms_binary, run_cli};
use tonic::transport::Channel;

/// How long to wait for the follower before declaring it stuck (a hang
/// guard, not a performance assertion).
const PATIENCE: Duration = Duration::from_secs(120);

/// A port on 127.0.0.1 that was free a moment ago (the server is restarted
/// on the same address, so that the follower can reconnect to it).
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

async fn connect(server: &DevServerProcess) -> Channel {
    Channel::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// Creates a key and encrypts `n` times under it; returns the last sequence
/// number in the log (VerifyAuditLog's, recorded before its own record).
/// Runs on a runtime of its own, which closes its connections when it ends:
/// an idle client connection left open would hold up the server's graceful
/// shutdown (a separate matter: issue 13, item 8).
fn generate(server: &DevServerProcess, n: usize) -> u64 {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(generate_on(server, n))
}

async fn generate_on(server: &DevServerProcess, n: usize) -> u64 {
    let channel = connect(server).await;
    let key = KeyManagementClient::new(channel.clone())
        .create_key(pb::CreateKeyRequest {
            description: "streamed".into(),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id;
    let mut crypto = CryptoClient::new(channel.clone());
    for i in 0..n {
        crypto
            .encrypt(pb::EncryptRequest {
                key_id: key.clone(),
                plaintext: format!("record {i}").into_bytes(),
                ..Default::default()
            })
            .await
            .expect("encrypt");
    }
    let report = AuditClient::new(channel)
        .verify_audit_log(pb::VerifyAuditLogRequest::default())
        .await
        .expect("verify")
        .into_inner();
    assert!(report.valid, "{report:?}");
    report.last_sequence
}

/// `kms audit tail --follow` as a child process, its JSON lines parsed on a
/// thread into sequence numbers.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
    seen: Vec<u64>,
}

impl Follower {
    fn start(addr: SocketAddr) -> Follower {
        let mut child = Command::new(kms_binary())
            .arg("--endpoint")
            .arg(format!("http://{addr}"))
            .args(["audit", "tail", "--follow", "--since-sequence", "1"])
            .env("KMS_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kms audit tail");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not one JSON object per line: {line:?}: {e}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Follower {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until the follower has printed sequence `target` (or more).
    fn wait_for(&mut self, target: u64) {
        let deadline = Instant::now() + PATIENCE;
        while self.seen.last().is_none_or(|&last| last < target) {
            let left = deadline.saturating_duration_since(Instant::now());
            let value = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "the follower stopped at {:?} waiting for {target}",
                    self.seen.last()
                )
            });
            for field in ["time", "principal", "operation", "result", "hash"] {
                assert!(value.get(field).is_some(), "{field} missing: {value}");
            }
            self.seen
                .push(value["sequence"].as_u64().expect("sequence is a number"));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_follower_sees_every_record_exactly_once_across_restarts() {
    let data = tempfile::tempdir().expect("data dir");
    let addr = free_addr();
    let mut server = DevServerProcess::start_at(data.path(), addr);
    let before = generate(&server, 5);
    let mut follower = Follower::start(addr);
    follower.wait_for(before);
    let live = generate(&server, 5);
    follower.wait_for(live);

    // A graceful restart: the server ends the stream (it must not hold the
    // shutdown open), the follower reconnects and resumes.
    server.terminate();
    let status = server.child.wait().expect("exit status");
    assert!(
        status.success(),
        "graceful exit with a follower attached: {status:?}"
    );
    drop(server);
    let server = DevServerProcess::start_at(data.path(), addr);
    let after_restart = generate(&server, 5);
    follower.wait_for(after_restart);

    // A crash: the connection just breaks.
    server.kill();
    let server = DevServerProcess::start_at(data.path(), addr);
    let after_crash = generate(&server, 5);
    follower.wait_for(after_crash + 1); // + VerifyAuditLog's own record

    let last = *follower.seen.last().expect("events");
    let expected: Vec<u64> = (1..=last).collect();
    assert_eq!(
        follower.seen, expected,
        "gaps or duplicates in the followed sequence"
    );
    // Opening each stream was audited once (not once per event): three
    // connections (initial, after the graceful restart, after the crash),
    // maybe more if the follower retried while the server was down.
    let (ok, out, err) = run_cli(
        &server.endpoint(),
        &["--json", "audit", "list", "--operation", "WatchAuditEvents"],
        b"",
    );
    assert!(ok, "{err}");
    let watches: serde_json::Value = serde_json::from_slice(&out).expect("json");
    let watches = watches.as_array().expect("array");
    assert!(
        watches.len() >= 3 && watches.len() < 20,
        "{} WatchAuditEvents records",
        watches.len()
    );
}

#[test]
fn audit_tail_without_follow_prints_a_range_as_json_lines() {
    let data = tempfile::tempdir().expect("data dir");
    let server = DevServerProcess::start(data.path());
    let last = generate(&server, 4);
    let (ok, out, err) = run_cli(
        &server.endpoint(),
        &["audit", "tail", "--since-sequence", "3"],
        b"",
    );
    assert!(ok, "{err}");
    let seqs: Vec<u64> = String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("json line");
            value["sequence"].as_u64().expect("sequence")
        })
        .collect();
    // From 3 to the end of the log when the command started: the records up
    // to VerifyAuditLog's (last + 1).
    assert_eq!(seqs, (3..=last + 1).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_watch_catches_up_then_follows_and_is_audited_once() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = super::create_key(&server, "watched").await; // 1
    for _ in 0..3 {
        super::encrypt(&server, &key, b"p", &[]).await; // 2, 3, 4
    }
    let mut stream = server
        .audit()
        .watch_audit_events(pb::WatchAuditEventsRequest { from_sequence: 2 })
        .await
        .expect("watch")
        .into_inner();
    let mut next = async || {
        let message = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("an event within the patience limit")
            .expect("stream ok")
            .expect("stream open");
        message.event.expect("event")
    };
    // Catch-up from 2, then the watch's own record (5).
    for expected in 2..=5 {
        assert_eq!(next().await.sequence, expected);
    }
    // Then records as they are committed, without polling on the client's part.
    super::encrypt(&server, &key, b"p", &[]).await; // 6
    let event = next().await;
    assert_eq!(event.sequence, 6);
    assert_eq!(event.operation, pb::Operation::Encrypt as i32);
    assert_eq!(event.key_id, key);
    super::encrypt(&server, &key, b"p", &[]).await; // 7
    assert_eq!(next().await.sequence, 7);

    // One record for the stream, none per event delivered.
    let mut out = Vec::new();
    server
        .service()
        .export_audit(
            &AuditFilter {
                operation: Some("WatchAuditEvents".to_owned()),
                ..AuditFilter::default()
            },
            &mut out,
        )
        .expect("export");
    assert_eq!(String::from_utf8(out).expect("utf-8").lines().count(), 1);
}

/// A shipper started before the server (at boot, in the same pod) waits for
/// it instead of exiting: `kms audit tail --follow` retries its first
/// connection. Before: it exited 1 with "is `kms serve` running?".
#[test]
fn a_follower_started_before_the_server_waits_for_it() {
    let addr = free_addr();
    let mut follower = Follower::start(addr);
    // Still running while nothing listens (it would have exited at once).
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        follower.child.try_wait().expect("try_wait").is_none(),
        "kms audit tail --follow exited while the server was down"
    );
    let data = tempfile::tempdir().expect("data dir");
    let server = DevServerProcess::start_at(data.path(), addr);
    let last = generate(&server, 3);
    follower.wait_for(last);
    assert_eq!(follower.seen, (1..=last).collect::<Vec<_>>());
    drop(server);
}
