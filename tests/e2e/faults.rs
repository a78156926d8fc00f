//! Faults under load: the HSM token disappears and comes back, and the audit
//! storage runs out of space. In both cases requests fail closed (UNAVAILABLE),
//! no request is acknowledged without its durable audit record, and nothing
//! acknowledged is lost.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use kms_tests::{TestEnv, TestServer};
use parking_lot::Mutex;
use tonic::Code;

use super::{create_key, ctx};

/// Outcomes seen by the load generator.
#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    unavailable: AtomicU64,
    /// (plaintext, blob) of every acknowledged Encrypt.
    acknowledged: Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
    other: Mutex<Vec<String>>,
}

/// `clients` tasks encrypting in a loop until `stop`.
fn spawn_load(
    server: &TestServer,
    key: &str,
    clients: usize,
    tally: &Arc<Tally>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|client| {
            let mut crypto = server.crypto();
            let key = key.to_owned();
            let tally = Arc::clone(tally);
            let stop = Arc::clone(stop);
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    let plaintext = format!("fault-load-{client}-{n}").into_bytes();
                    let result = crypto
                        .encrypt(pb::EncryptRequest {
                            key_id: key.clone(),
                            plaintext: plaintext.clone(),
                            encryption_context: ctx(&[("client", "load")]),
                        })
                        .await;
                    match result {
                        Ok(reply) => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                            tally
                                .acknowledged
                                .lock()
                                .push((plaintext, reply.into_inner().ciphertext_blob));
                        }
                        Err(status) if status.code() == Code::Unavailable => {
                            tally.unavailable.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(status) => tally.other.lock().push(format!("{status:?}")),
                    }
                }
            })
        })
        .collect()
}

/// Audit records of successful Encrypts.
fn audited_encrypt_successes(server: &TestServer) -> u64 {
    let mut export = Vec::new();
    server
        .service()
        .export_audit(&Default::default(), &mut export)
        .expect("export");
    String::from_utf8(export)
        .expect("utf8")
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("json"))
        .filter(|r| r["operation"] == "Encrypt" && r["result"] == "OK")
        .count() as u64
}

/// Every `stride`-th acknowledged blob decrypts to its exact plaintext.
async fn check_acknowledged(server: &TestServer, tally: &Tally, stride: usize) {
    let acknowledged = std::mem::take(&mut *tally.acknowledged.lock());
    let mut crypto = server.crypto();
    for (plaintext, blob) in acknowledged.iter().step_by(stride) {
        let opened = crypto
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: blob.clone(),
                encryption_context: ctx(&[("client", "load")]),
                key_id: String::new(),
            })
            .await
            .expect("an acknowledged blob decrypts")
            .into_inner();
        assert_eq!(&opened.plaintext, plaintext);
    }
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_vanishing_under_load_fails_closed_and_recovers_without_a_restart() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "hsm fault").await;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(&server, &key, 8, &tally, &stop);
    // Rotation writes to the token: with SoftHSM2 that is what notices the
    // token is gone (encryption with a cached handle never touches the disk).
    let rotations = Arc::new(AtomicU64::new(0));
    let rotator = {
        let mut keys = server.keys();
        let key = key.clone();
        let stop = Arc::clone(&stop);
        let rotations = Arc::clone(&rotations);
        let tally = Arc::clone(&tally);
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                match keys
                    .rotate_key(pb::RotateKeyRequest {
                        key_id: key.clone(),
                    })
                    .await
                {
                    Ok(_) => {
                        rotations.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) if status.code() == Code::Unavailable => {}
                    Err(status) => tally.other.lock().push(format!("rotate: {status:?}")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    wait_until("traffic", Duration::from_secs(20), || {
        tally.ok.load(Ordering::Relaxed) > 100 && rotations.load(Ordering::Relaxed) > 0
    })
    .await;
    // The token directory goes away (a pulled HSM, a lost network HSM).
    let token_dir = env.token_dir().to_owned();
    let moved: PathBuf = token_dir.with_extension("gone");
    std::fs::rename(&token_dir, &moved).expect("move the token away");
    let waited = Instant::now();
    while tally.unavailable.load(Ordering::Relaxed) <= 20 {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "no UNAVAILABLE answers while the token is gone: {} ok, {} rotations, other: {:?}",
            tally.ok.load(Ordering::Relaxed),
            rotations.load(Ordering::Relaxed),
            tally.other.lock()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ok_during_outage = tally.ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // In-flight requests may complete as the token goes; after that, none.
    let ok_later = tally.ok.load(Ordering::Relaxed);
    assert!(
        ok_later - ok_during_outage <= 16,
        "requests kept succeeding without the token: {ok_during_outage} -> {ok_later}"
    );
    // The token comes back: the same server recovers by itself.
    std::fs::rename(&moved, &token_dir).expect("restore the token");
    let before_recovery = tally.ok.load(Ordering::Relaxed);
    wait_until("recovery", Duration::from_secs(30), || {
        tally.ok.load(Ordering::Relaxed) > before_recovery + 100
    })
    .await;
    let rotations_before = rotations.load(Ordering::Relaxed);
    wait_until("rotation after recovery", Duration::from_secs(30), || {
        rotations.load(Ordering::Relaxed) > rotations_before
    })
    .await;
    stop.store(true, Ordering::Release);
    for task in load {
        task.await.expect("load task");
    }
    rotator.await.expect("rotator");

    assert!(tally.other.lock().is_empty(), "{:?}", tally.other.lock());
    // Every acknowledged request has its audit record (records of requests
    // whose reply was lost in flight could exceed it; here none are lost).
    assert_eq!(
        audited_encrypt_successes(&server),
        tally.ok.load(Ordering::Relaxed)
    );
    // Everything acknowledged decrypts.
    check_acknowledged(&server, &tally, 7).await;
    let report = server.service().verify_chain(None).expect("verify");
    assert!(report.is_ok(), "{report:?}");
    server.stop().await;
}

/// A small tmpfs, so that the database can be made to run out of space.
struct SmallFilesystem {
    path: PathBuf,
}

impl SmallFilesystem {
    fn mount(path: &Path, size: &str) -> SmallFilesystem {
        std::fs::create_dir_all(path).expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test mounts a small tmpfs to fill the audit storage and needs root \
             (the README test command runs as root)"
        );
        SmallFilesystem {
            path: path.to_owned(),
        }
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let block = vec![0xa5u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_filesystem_fails_every_key_use_and_loses_nothing_acknowledged() {
    let env = TestEnv::new();
    let fs = SmallFilesystem::mount(&env.data.path().join("small-fs"), "48m");
    let mut config = env.config();
    config.data_dir = fs.path.join("db");
    let server = env.start_with(config.clone()).await;
    let key = create_key(&server, "audit fail closed").await;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(&server, &key, 8, &tally, &stop);
    wait_until("traffic", Duration::from_secs(20), || {
        tally.ok.load(Ordering::Relaxed) > 100
    })
    .await;

    let filler = fs.fill();
    wait_until("the audit log to refuse", Duration::from_secs(60), || {
        tally.unavailable.load(Ordering::Relaxed) > 50
    })
    .await;
    // Once refused, nothing succeeds any more: the log is poisoned, not retried
    // behind the callers' backs.
    let ok_after_failure = tally.ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(tally.ok.load(Ordering::Relaxed), ok_after_failure);
    // Other key uses are refused too.
    let status = server
        .crypto()
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: key.clone(),
            length: Some(pb::generate_data_key_request::Length::NumberOfBytes(32)),
            ..Default::default()
        })
        .await
        .expect_err("data key without an audit log");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Health says so: a poisoned audit log takes every service down.
    {
        use tonic_health::pb::health_check_response::ServingStatus;
        let limit = Duration::from_secs(10);
        for service in ["", "kms.v1.Crypto", "kms.v1.KeyManagement", "kms.v1.Audit"] {
            super::health::wait_for(&server, service, ServingStatus::NotServing, limit).await;
        }
    }
    stop.store(true, Ordering::Release);
    for task in load {
        task.await.expect("load task");
    }
    assert!(tally.other.lock().is_empty(), "{:?}", tally.other.lock());
    server.stop().await;

    // Space comes back; after a restart every acknowledged request is there.
    std::fs::remove_file(filler).expect("free space");
    let server = env.start_with(config).await;
    let report = server.service().verify_chain(None).expect("verify");
    assert!(report.is_ok(), "{report:?}");
    let acknowledged = tally.ok.load(Ordering::Relaxed);
    let audited = audited_encrypt_successes(&server);
    assert!(
        audited >= acknowledged,
        "{acknowledged} acknowledged, {audited} audited"
    );
    check_acknowledged(&server, &tally, 11).await;
    server.stop().await;
    drop(fs);
}
