//! Backups that lose nothing (issue 15 item 4; design note
//! `hierarchy-and-cluster.md` §1.6), against real `kms serve --config`
//! processes on their own SoftHSM2 token holding a root key: a backup taken
//! with `kms backup create` while clients encrypt and rotate, more load, a
//! key deleted, then `kms backup restore` over the live data directory. Every
//! acknowledged ciphertext still decrypts (those of the deleted key aside),
//! the deleted key stays deleted, every key gets a new primary version, the
//! audit log verifies; a tampered backup and a backup whose root epoch the
//! HSM lacks are refused before anything is restored.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kms::config::Config;
use kms::service::KmsService;
use kms_hsm::testing::TestToken;
use kms_proto::v1 as pb;
use kms_proto::v1::audit_client::AuditClient;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_tests::kms_binary;
use tonic::transport::Channel;

const ADMIN: &str = "spiffe://example.org/ops/backup-admin";

/// One deployment: a token with a root of `epoch`, a configuration file,
/// a data directory and a backup directory.
struct Deployment {
    token: TestToken,
    dir: tempfile::TempDir,
}

impl Deployment {
    fn new(root_epoch: u32) -> Deployment {
        let token = TestToken::new();
        let so = token.so_pin_source().read().expect("SO PIN");
        let user = token.pin_source().read().expect("user PIN");
        let mut value = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut value))
            .expect("/dev/urandom");
        kms_hsm::testing::import_test_root(
            token.module_path(),
            token.label(),
            &so,
            &user,
            root_epoch,
            &value,
        )
        .expect("import the test root");
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(dir.path().join("backups")).expect("backups dir");
        let deployment = Deployment { token, dir };
        deployment.write_config();
        deployment
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config_file(&self) -> PathBuf {
        self.path("kms.toml")
    }

    fn write_config(&self) {
        let quoted = |p: &Path| format!("{:?}", p.display().to_string());
        let pin = match self.token.pin_source() {
            kms_hsm::PinSource::File(path) => path,
            other => panic!("test tokens keep their PIN in a file, not {other}"),
        };
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nrequest_timeout_ms = 30000\nshutdown_grace_ms = 5000\n\
             \n[auth]\nadmins = [{ADMIN:?}]\nanonymous_principal = {ADMIN:?}\n\
             \n[[auth.default_grants]]\nprincipal = \"*\"\npermissions = [\"encrypt\", \"decrypt\", \"describe\", \"rotate\", \"manage\"]\n\
             \n[hsm]\nmodule = {module}\ntoken_label = {label:?}\npin_file = {pin}\nsync_token_dir = {token_dir}\nwrapped_versions = true\n\
             \n[storage]\ndata_dir = {data}\n\
             \n[audit]\ncheckpoint_every_records = 50\n\
             \n[backup]\ndir = {backups}\n",
            module = quoted(self.token.module_path()),
            label = self.token.label(),
            pin = quoted(&pin),
            token_dir = quoted(self.token.token_dir()),
            data = quoted(&self.path("data")),
            backups = quoted(&self.path("backups")),
        );
        std::fs::write(self.config_file(), text).expect("write kms.toml");
    }

    /// `kms serve --config`, waiting for its banner.
    fn start(&self) -> Server {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("kms.log"))
            .expect("log");
        let mut child = Command::new(kms_binary())
            .args(["serve", "--config"])
            .arg(self.config_file())
            .env("SOFTHSM2_CONF", self.token.softhsm_conf())
            .env("KMS_LOG", "info,cryptoki::mechanism=off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn kms serve");
        let mut reader = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut banner = String::new();
        reader.read_line(&mut banner).expect("banner");
        std::thread::spawn(move || {
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        });
        let addr: std::net::SocketAddr = banner
            .strip_prefix("kms listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!(
                    "unexpected banner {banner:?}; log:\n{}",
                    std::fs::read_to_string(self.path("kms.log")).unwrap_or_default()
                )
            });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_lazy();
        Server {
            child,
            endpoint: format!("http://{addr}"),
            channel,
        }
    }

    /// Runs the `kms` binary with `args` (the token's SOFTHSM2_CONF set).
    fn kms(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(kms_binary())
            .args(args)
            .env("SOFTHSM2_CONF", self.token.softhsm_conf())
            .env("KMS_LOG", "warn,cryptoki::mechanism=off")
            .stdin(Stdio::null())
            .output()
            .expect("run kms");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

struct Server {
    child: Child,
    endpoint: String,
    channel: Channel,
}

impl Server {
    fn keys(&self) -> KeyManagementClient<Channel> {
        KeyManagementClient::new(self.channel.clone())
    }

    fn crypto(&self) -> CryptoClient<Channel> {
        CryptoClient::new(self.channel.clone())
    }

    fn audit(&self) -> AuditClient<Channel> {
        AuditClient::new(self.channel.clone())
    }

    /// SIGTERM and wait for the graceful exit.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let exit = self.child.wait().expect("wait");
        assert!(exit.success(), "kms serve exited with {exit}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An acknowledged ciphertext.
#[derive(Debug, Clone)]
struct Acked {
    key: String,
    plaintext: Vec<u8>,
    blob: Vec<u8>,
}

async fn create_key(server: &Server, description: &str) -> String {
    server
        .keys()
        .create_key(pb::CreateKeyRequest {
            description: description.to_owned(),
            ..Default::default()
        })
        .await
        .expect("CreateKey")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id
}

async fn encrypt(server: &Server, key: &str, plaintext: &[u8]) -> Acked {
    let blob = server
        .crypto()
        .encrypt(pb::EncryptRequest {
            key_id: key.to_owned(),
            plaintext: plaintext.to_vec(),
            encryption_context: Default::default(),
        })
        .await
        .expect("Encrypt")
        .into_inner()
        .ciphertext_blob;
    Acked {
        key: key.to_owned(),
        plaintext: plaintext.to_vec(),
        blob,
    }
}

async fn rotate(server: &Server, key: &str) {
    server
        .keys()
        .rotate_key(pb::RotateKeyRequest {
            key_id: key.to_owned(),
        })
        .await
        .expect("RotateKey");
}

async fn versions(server: &Server, key: &str) -> Vec<pb::KeyVersion> {
    server
        .keys()
        .list_key_versions(pb::ListKeyVersionsRequest {
            key_id: key.to_owned(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .expect("ListKeyVersions")
        .into_inner()
        .versions
}

async fn describe(server: &Server, key: &str) -> Result<pb::KeyMetadata, tonic::Status> {
    server
        .keys()
        .describe_key(pb::DescribeKeyRequest {
            key_id: key.to_owned(),
        })
        .await
        .map(|r| r.into_inner().key_metadata.expect("metadata"))
}

/// Clients encrypting under every key and rotating them, until `stop`.
fn start_load(
    server: &Server,
    keys: &[String],
    acked: &Arc<Mutex<Vec<Acked>>>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..3)
        .map(|client| {
            let server_keys = server.keys();
            let crypto = server.crypto();
            let keys = keys.to_vec();
            let acked = Arc::clone(acked);
            let stop = Arc::clone(stop);
            tokio::spawn(async move {
                let mut n = 0usize;
                while !stop.load(Ordering::Acquire) {
                    let key = &keys[(client + n) % keys.len()];
                    let plaintext = format!("client {client} message {n}").into_bytes();
                    let reply = crypto
                        .clone()
                        .encrypt(pb::EncryptRequest {
                            key_id: key.clone(),
                            plaintext: plaintext.clone(),
                            encryption_context: Default::default(),
                        })
                        .await
                        .expect("Encrypt under load");
                    acked.lock().expect("lock").push(Acked {
                        key: key.clone(),
                        plaintext,
                        blob: reply.into_inner().ciphertext_blob,
                    });
                    if n % 7 == 3 {
                        server_keys
                            .clone()
                            .rotate_key(pb::RotateKeyRequest {
                                key_id: key.clone(),
                            })
                            .await
                            .expect("RotateKey under load");
                    }
                    n += 1;
                }
            })
        })
        .collect()
}

async fn wait_for_acks(acked: &Arc<Mutex<Vec<Acked>>>, at_least: usize) {
    for _ in 0..3000 {
        if acked.lock().expect("lock").len() >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the load made no progress");
}

/// Finishes the deletion of every key pending deletion, as the scheduler
/// does once the waiting period is over (in this process: the time is moved
/// 31 days ahead, past any waiting period). The server must be stopped.
async fn run_scheduler_past_deletions(config_file: &Path) -> usize {
    let config = Config::load(config_file).expect("config");
    tokio::task::spawn_blocking(move || {
        let service = KmsService::open(&config).expect("open the service in-process");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        let pass = service.run_scheduler_pass_at(now + 31 * 24 * 3600 * 1000);
        assert_eq!(pass.failed, 0, "{pass:?}");
        pass.deleted
    })
    .await
    .expect("scheduler pass")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_under_load_restores_every_acknowledged_ciphertext_and_no_destroyed_key() {
    let deployment = Deployment::new(1);
    let server = deployment.start();
    let mut keys = Vec::new();
    for i in 0..4 {
        keys.push(create_key(&server, &format!("backup test key {i}")).await);
    }
    let doomed = keys[3].clone();

    // Load, and a backup in the middle of it.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&server, &keys, &acked, &stop);
    wait_for_acks(&acked, 30).await;
    let backup = deployment.path("backups").join("b1");
    let backup_arg = backup.display().to_string();
    let endpoint = server.endpoint.clone();
    let created = tokio::task::spawn_blocking(move || {
        kms_tests::run_cli(
            &endpoint,
            &["--json", "backup", "create", "--out", &backup_arg],
            b"",
        )
    })
    .await
    .expect("join");
    assert!(created.0, "kms backup create failed: {}", created.2);
    let report: serde_json::Value = serde_json::from_slice(&created.1).expect("JSON");
    assert_eq!(report["root_epochs"], serde_json::json!([1]), "{report}");
    assert!(
        report["audit_head_sequence"].as_u64().unwrap_or(0) > 0,
        "{report}"
    );
    let at_backup = acked.lock().expect("lock").len();
    wait_for_acks(&acked, at_backup + 30).await;
    stop.store(true, Ordering::Release);
    for task in load {
        task.await.expect("load task");
    }

    // More after the backup: a rotation and ciphertexts under the new
    // versions (absent from the backup), and a key deleted.
    let mut after = Vec::new();
    for key in &keys[..3] {
        rotate(&server, key).await;
        after.push(encrypt(&server, key, format!("after backup {key}").as_bytes()).await);
    }
    after.push(encrypt(&server, &doomed, b"under the key that will be deleted").await);
    acked.lock().expect("lock").extend(after);
    let mut versions_before: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for key in &keys[..3] {
        versions_before.insert(
            key.clone(),
            versions(&server, key)
                .await
                .iter()
                .map(|v| v.version)
                .collect(),
        );
    }
    server
        .keys()
        .schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
            key_id: doomed.clone(),
            pending_window_days: Some(7),
        })
        .await
        .expect("ScheduleKeyDeletion");
    // Refused: another backup into the same, non-empty directory.
    let refused = deployment.kms(&[
        "--endpoint",
        &server.endpoint,
        "backup",
        "create",
        "--out",
        &backup.display().to_string(),
    ]);
    assert!(
        !refused.0 && refused.2.contains("not an empty directory"),
        "{refused:?}"
    );
    // Refused: a path outside [backup] dir.
    let outside = deployment.path("elsewhere").display().to_string();
    let refused = deployment.kms(&[
        "--endpoint",
        &server.endpoint,
        "backup",
        "create",
        "--out",
        &outside,
    ]);
    assert!(
        !refused.0 && refused.2.contains("inside the backup directory"),
        "{refused:?}"
    );
    server.stop();
    assert_eq!(
        run_scheduler_past_deletions(&deployment.config_file()).await,
        1
    );

    // Restore over the live data directory (its audit log is the ledger).
    let config = deployment.config_file().display().to_string();
    let from = backup.display().to_string();
    let restored = deployment.kms(&["backup", "restore", "--from", &from, "--config", &config]);
    assert!(
        !restored.0 && restored.2.contains("--force-replace"),
        "{restored:?}"
    );
    let restored = deployment.kms(&[
        "--json",
        "backup",
        "restore",
        "--from",
        &from,
        "--config",
        &config,
        "--force-replace",
    ]);
    assert!(restored.0, "kms backup restore failed: {}", restored.2);
    let report: serde_json::Value = serde_json::from_str(&restored.1).expect("JSON");
    assert_eq!(
        report["replayed_destructions"],
        serde_json::json!([doomed]),
        "{report}"
    );
    assert!(
        report["replaced_dir"]
            .as_str()
            .is_some_and(|d| Path::new(d).is_dir()),
        "the replaced data directory is kept: {report}"
    );

    let server = deployment.start();
    let acked = acked.lock().expect("lock").clone();
    let mut decrypted = 0;
    for item in &acked {
        let result = server
            .crypto()
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: item.blob.clone(),
                encryption_context: Default::default(),
                key_id: String::new(),
            })
            .await;
        if item.key == doomed {
            assert!(
                result.is_err(),
                "a ciphertext of the deleted key decrypts after the restore"
            );
        } else {
            let plaintext = result
                .unwrap_or_else(|e| {
                    panic!("an acknowledged ciphertext of {} is lost: {e}", item.key)
                })
                .into_inner()
                .plaintext;
            assert_eq!(plaintext, item.plaintext);
            decrypted += 1;
        }
    }
    assert!(decrypted > 60, "only {decrypted} ciphertexts checked");
    let deleted = describe(&server, &doomed)
        .await
        .expect("the tombstone stays");
    assert_eq!(
        deleted.state,
        pb::KeyState::Deleted as i32,
        "the deleted key came back"
    );
    for key in &keys[..3] {
        let metadata = describe(&server, key).await.expect("describe");
        assert_eq!(metadata.state, pb::KeyState::Enabled as i32);
        assert!(
            !versions_before[key].contains(&metadata.primary_version),
            "key {key}: primary version {} existed before the restore (its GCM counter is not trusted)",
            metadata.primary_version
        );
        let after: BTreeSet<u32> = versions(&server, key)
            .await
            .iter()
            .map(|v| v.version)
            .collect();
        assert!(
            versions_before[key].is_subset(&after),
            "key {key}: versions before {:?}, after the restore {after:?}",
            versions_before[key]
        );
        // New ciphertexts use the new primary and decrypt.
        let fresh = encrypt(&server, key, b"after the restore").await;
        let back = server
            .crypto()
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: fresh.blob,
                encryption_context: Default::default(),
                key_id: String::new(),
            })
            .await
            .expect("decrypt a new ciphertext")
            .into_inner();
        assert_eq!(back.key_version, metadata.primary_version);
    }
    let verified = server
        .audit()
        .verify_audit_log(pb::VerifyAuditLogRequest::default())
        .await
        .expect("VerifyAuditLog")
        .into_inner();
    assert!(verified.valid, "{verified:?}");
    let restore_records = server
        .audit()
        .list_audit_events(pb::ListAuditEventsRequest {
            operation: pb::Operation::Restore as i32,
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("ListAuditEvents")
        .into_inner()
        .events;
    let named: BTreeSet<&str> = restore_records.iter().map(|e| e.key_id.as_str()).collect();
    assert!(named.contains(""), "the restore itself is recorded");
    assert!(
        named.contains(doomed.as_str()),
        "the replayed deletion is recorded"
    );
    for key in &keys[..3] {
        assert!(
            named.contains(key.as_str()),
            "the rotation of {key} is recorded"
        );
    }
    let backup_id = report["backup_id"].as_str().expect("backup id");
    assert!(
        restore_records
            .iter()
            .all(|e| e.request_id == format!("restore-{}", &backup_id[..16])),
        "{restore_records:?}"
    );
    server.stop();

    // A backup whose root epoch the HSM lacks is refused, naming the epoch,
    // before anything is touched.
    let other = Deployment::new(2);
    let target = other.path("data");
    let refused = other.kms(&[
        "backup",
        "restore",
        "--from",
        &from,
        "--config",
        &other.config_file().display().to_string(),
    ]);
    assert!(!refused.0, "restored without its root: {refused:?}");
    assert!(refused.2.contains("root key epoch 1"), "{}", refused.2);
    assert!(
        !target.exists(),
        "the refused restore wrote the data directory"
    );

    // A tampered backup is refused by the manifest check.
    let sst = std::fs::read_dir(backup.join("db"))
        .expect("backup db")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "sst"))
        .expect("an SST file in the backup");
    let mut bytes = std::fs::read(&sst).expect("read sst");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    // A hard link may share the file with the live database: replace it.
    std::fs::remove_file(&sst).expect("unlink");
    std::fs::write(&sst, &bytes).expect("write tampered sst");
    let fresh = deployment.path("fresh-data").display().to_string();
    let refused = deployment.kms(&[
        "backup",
        "restore",
        "--from",
        &from,
        "--config",
        &config,
        "--data-dir",
        &fresh,
    ]);
    assert!(!refused.0, "a tampered backup was restored");
    assert!(
        refused.2.contains("does not match the manifest"),
        "{}",
        refused.2
    );
    assert!(!Path::new(&fresh).exists());
}

/// The offline form: a stopped server's data directory backed up and
/// restored into a new data directory, with an audit export as the ledger
/// (the replaced directory is lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_backup_restores_with_an_audit_export_as_the_ledger() {
    let deployment = Deployment::new(1);
    let server = deployment.start();
    let kept = create_key(&server, "kept").await;
    let doomed = create_key(&server, "doomed").await;
    let before = encrypt(&server, &kept, b"before the backup").await;
    server.stop();
    let data = deployment.path("data").display().to_string();
    let backup = deployment.path("offline-backup").display().to_string();
    let created = deployment.kms(&["backup", "create", "--data-dir", &data, "--out", &backup]);
    assert!(created.0, "offline backup failed: {}", created.2);

    let server = deployment.start();
    server
        .keys()
        .schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
            key_id: doomed.clone(),
            pending_window_days: Some(7),
        })
        .await
        .expect("ScheduleKeyDeletion");
    server.stop();
    assert_eq!(
        run_scheduler_past_deletions(&deployment.config_file()).await,
        1
    );
    let server = deployment.start();
    let export = deployment.path("audit.jsonl").display().to_string();
    let exported = deployment.kms(&[
        "--endpoint",
        &server.endpoint,
        "audit",
        "export",
        "--out",
        &export,
    ]);
    assert!(exported.0, "{exported:?}");
    server.stop();

    // The data directory is lost; restore into a new one.
    std::fs::rename(deployment.path("data"), deployment.path("lost")).expect("lose the data dir");
    let config = deployment.config_file().display().to_string();
    let restored = deployment.kms(&[
        "backup",
        "restore",
        "--from",
        &backup,
        "--config",
        &config,
        "--audit-since",
        &export,
    ]);
    assert!(restored.0, "{restored:?}");
    let server = deployment.start();
    let deleted = describe(&server, &doomed).await.expect("tombstone");
    assert_eq!(
        deleted.state,
        pb::KeyState::Deleted as i32,
        "the deleted key came back"
    );
    let back = server
        .crypto()
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: before.blob.clone(),
            encryption_context: Default::default(),
            key_id: String::new(),
        })
        .await
        .expect("decrypt")
        .into_inner();
    assert_eq!(back.plaintext, before.plaintext);
    assert_eq!(
        describe(&server, &kept)
            .await
            .expect("describe")
            .primary_version,
        2
    );
    let verified = server
        .audit()
        .verify_audit_log(pb::VerifyAuditLogRequest::default())
        .await
        .expect("VerifyAuditLog")
        .into_inner();
    assert!(verified.valid, "{verified:?}");
    server.stop();
}
