//! Root rotation (issue 14 item 5) with real `kms` processes on a real
//! SoftHSM2 token and RocksDB: the `kms hsm rotate-root` ceremony while the
//! server runs, adoption of the new root on `kms admin reload`, the
//! background re-wrap job (also across a graceful restart and a SIGKILL in
//! the middle of it), `kms hsm roots` and `kms hsm destroy-root`, and the
//! ceremony's refusals (variant N, a wrong or missing SO PIN file).
//!
//! Waiting for the job polls `kms hsm roots` with a generous deadline; no
//! assertion is about how long anything took.

use std::process::Command;
use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_tests::{kms_binary, run_cli};
use serde_json::Value;
use tonic::transport::Channel;

use super::configured::{ADMIN, Deployment, ServerProcess, Settings};

/// How the re-wrap job is paced in a test (`[rotation]`).
struct Pace {
    scheduler_interval_secs: u64,
    batch: usize,
    pause_ms: u64,
}

/// Writes the configuration (anonymous loopback callers are the
/// administrator) with `pace` as its `[rotation]` section.
fn write_config(dep: &Deployment, pace: &Pace) {
    dep.write_config(&Settings {
        anonymous_principal: Some(ADMIN.to_owned()),
        ..Settings::default()
    });
    let mut text = std::fs::read_to_string(dep.config_file()).expect("config");
    text += &format!(
        "\n[rotation]\nscheduler_interval_secs = {}\nroot_rewrap_batch = {}\nroot_rewrap_pause_ms = {}\n",
        pace.scheduler_interval_secs, pace.batch, pace.pause_ms
    );
    std::fs::write(dep.config_file(), text).expect("write config");
}

/// Runs a `kms hsm` ceremony on the deployment's token; (success, stderr).
fn ceremony(dep: &Deployment, args: &[&str]) -> (bool, String) {
    let output = Command::new(kms_binary())
        .arg("hsm")
        .args(args)
        .arg("--module")
        .arg(kms_hsm::softhsm2_module_path())
        .args(["--label", "kms-e2e"])
        .env("SOFTHSM2_CONF", dep.dir.join("softhsm2.conf"))
        .env("KMS_LOG", "warn,cryptoki::mechanism=off")
        .output()
        .expect("kms hsm");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn pin_file(dep: &Deployment, name: &str) -> String {
    dep.dir.join(name).display().to_string()
}

fn init_root(dep: &Deployment) {
    let so = pin_file(dep, "so.pin");
    let (ok, stderr) = ceremony(dep, &["init-root", "--so-pin-file", &so]);
    assert!(ok, "init-root: {stderr}");
}

fn rotate_root(dep: &Deployment) -> (bool, String) {
    let so = pin_file(dep, "so.pin");
    let user = pin_file(dep, "hsm.pin");
    ceremony(
        dep,
        &["rotate-root", "--so-pin-file", &so, "--pin-file", &user],
    )
}

fn endpoint(server: &ServerProcess) -> String {
    format!("http://{}", server.addr)
}

fn cli_ok(server: &ServerProcess, args: &[&str]) -> Vec<u8> {
    let (ok, stdout, stderr) = run_cli(&endpoint(server), args, b"");
    assert!(ok, "kms {args:?} failed: {stderr}");
    stdout
}

/// `kms --json hsm roots`.
fn roots(server: &ServerProcess) -> Value {
    serde_json::from_slice(&cli_ok(server, &["--json", "hsm", "roots"])).expect("json")
}

/// [`roots`], naming the server's log if the call fails.
fn roots_logged(server: &ServerProcess, dep: &Deployment) -> Value {
    let (ok, stdout, stderr) = run_cli(&endpoint(server), &["--json", "hsm", "roots"], b"");
    assert!(
        ok,
        "kms hsm roots failed: {stderr}\nserver log:\n{}",
        dep.log()
    );
    serde_json::from_slice(&stdout).expect("json")
}

/// (versions, service keys) the roots report gives `epoch`; (0, 0) if absent.
fn held_by(report: &Value, epoch: u64) -> (u64, u64) {
    report["roots"]
        .as_array()
        .expect("roots")
        .iter()
        .find(|r| r["epoch"] == epoch)
        .map_or((0, 0), |r| {
            (
                r["versions"].as_u64().expect("versions"),
                r["service_keys"].as_u64().expect("service keys"),
            )
        })
}

/// Polls `kms hsm roots` until epoch `epoch` holds nothing.
fn wait_until_empty(server: &ServerProcess, dep: &Deployment, epoch: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let report = roots(server);
        if held_by(&report, epoch) == (0, 0) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "the re-wrap job did not finish: {report}\nlog:\n{}",
            dep.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn channel(server: &ServerProcess) -> Channel {
    server.plain_endpoint().connect().await.expect("connect")
}

async fn create_key(channel: &Channel) -> String {
    KeyManagementClient::new(channel.clone())
        .create_key(pb::CreateKeyRequest::default())
        .await
        .expect("CreateKey")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id
}

async fn rotate(channel: &Channel, key: &str) {
    KeyManagementClient::new(channel.clone())
        .rotate_key(pb::RotateKeyRequest {
            key_id: key.to_owned(),
        })
        .await
        .expect("RotateKey");
}

async fn encrypt(channel: &Channel, key: &str, plaintext: &[u8]) -> Vec<u8> {
    CryptoClient::new(channel.clone())
        .encrypt(pb::EncryptRequest {
            key_id: key.to_owned(),
            plaintext: plaintext.to_vec(),
            encryption_context: Default::default(),
        })
        .await
        .expect("Encrypt")
        .into_inner()
        .ciphertext_blob
}

async fn decrypt(channel: &Channel, blob: &[u8]) -> Vec<u8> {
    CryptoClient::new(channel.clone())
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: blob.to_vec(),
            ..Default::default()
        })
        .await
        .expect("Decrypt")
        .into_inner()
        .plaintext
}

/// (version, state, root epoch) of every version of `key`.
async fn versions(channel: &Channel, key: &str) -> Vec<(u32, i32, u32)> {
    KeyManagementClient::new(channel.clone())
        .list_key_versions(pb::ListKeyVersionsRequest {
            key_id: key.to_owned(),
            ..Default::default()
        })
        .await
        .expect("ListKeyVersions")
        .into_inner()
        .versions
        .iter()
        .map(|v| (v.version, v.state, v.root_epoch))
        .collect()
}

/// Ciphertexts and their plaintexts.
type Made = Vec<(Vec<u8>, Vec<u8>)>;

async fn decrypt_all(channel: &Channel, made: &Made) {
    for (blob, plaintext) in made {
        assert_eq!(&decrypt(channel, blob).await, plaintext);
    }
}

fn stop(mut server: ServerProcess) {
    server.signal("TERM");
    assert!(
        server.wait_for_exit(Duration::from_secs(60)).is_some(),
        "the server did not stop"
    );
}

fn destroy_root(server: &ServerProcess, epoch: u32) -> (bool, String) {
    let (ok, _, stderr) = run_cli(
        &endpoint(server),
        &["hsm", "destroy-root", "--epoch", &epoch.to_string()],
        b"",
    );
    (ok, stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn root_rotation_round_trip_from_the_cli() {
    let dep = Deployment::new();
    init_root(&dep);
    // One re-wrap step, then an hour's pause: after the new root is
    // adopted, at most one version moves until the server is restarted
    // with a faster pace (which also shows the job resumes after a restart).
    write_config(
        &dep,
        &Pace {
            scheduler_interval_secs: 3600,
            batch: 1,
            pause_ms: 3_600_000,
        },
    );
    let server = dep.start();
    let ch = channel(&server).await;
    let mut made: Made = Vec::new();
    let mut keys = Vec::new();
    for k in 0..2u8 {
        let key = create_key(&ch).await;
        for v in 1..=3u8 {
            if v > 1 {
                rotate(&ch, &key).await;
            }
            let plaintext = vec![k, v, 0xab];
            made.push((encrypt(&ch, &key, &plaintext).await, plaintext));
        }
        keys.push(key);
    }
    // A disabled version keeps its state through the re-wrap.
    cli_ok(&server, &["key", "disable-version", &keys[1], "1"]);

    let report = roots(&server);
    assert_eq!(report["active_epoch"], 1);
    assert_eq!(report["variant"], "trusted");
    assert_eq!(held_by(&report, 1), (6, 2));
    let (ok, stderr) = destroy_root(&server, 1);
    assert!(!ok, "destroying the active root must be refused");
    assert!(stderr.contains("active root"), "{stderr}");

    // The ceremony, while the server runs.
    let (ok, stderr) = rotate_root(&dep);
    assert!(ok, "rotate-root: {stderr}");
    assert!(stderr.contains("kms-root/2"), "{stderr}");
    let report = roots(&server);
    assert_eq!(report["active_epoch"], 1, "not adopted before the reload");
    let two = report["roots"]
        .as_array()
        .expect("roots")
        .iter()
        .find(|r| r["epoch"] == 2)
        .expect("epoch 2 listed")
        .clone();
    assert_eq!(two["present_in_hsm"], true);
    assert_eq!(two["active"], false);

    // The reload adopts it, and says so: new versions are wrapped under epoch 2.
    let reloaded = String::from_utf8(cli_ok(&server, &["admin", "reload"])).expect("utf8");
    assert!(
        reloaded.contains("wrapped under root kms-root/2") && !reloaded.contains("NOT adopted"),
        "{reloaded}"
    );
    assert_eq!(roots(&server)["active_epoch"], 2);
    rotate(&ch, &keys[0]).await;
    let newest = versions(&ch, &keys[0]).await;
    assert_eq!(newest.last().map(|v| (v.0, v.2)), Some((4, 2)));
    let plaintext = b"under root 2".to_vec();
    made.push((encrypt(&ch, &keys[0], &plaintext).await, plaintext));

    // The job's first step is bounded: the two service keys (integrity and
    // audit checkpoint) and one version
    // (`root_rewrap_batch = 1`), then the long pause.
    let deadline = Instant::now() + Duration::from_secs(120);
    while held_by(&roots_logged(&server, &dep), 1).0 == 6 {
        assert!(Instant::now() < deadline, "no progress:\n{}", dep.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = roots(&server);
    assert_eq!(held_by(&report, 1), (5, 0), "{report}");
    assert_eq!(held_by(&report, 2), (2, 2), "{report}");

    // Still referenced: refused, naming the count.
    let (ok, stderr) = destroy_root(&server, 1);
    assert!(!ok, "destroying a referenced root must be refused");
    assert!(
        stderr.contains("still referenced by 5 key version(s) and 0 service key(s)"),
        "{stderr}"
    );
    assert_eq!(held_by(&roots(&server), 1), (5, 0));
    drop(ch);
    stop(server);

    // Restarted with a fast pace: the job resumes and finishes.
    write_config(
        &dep,
        &Pace {
            scheduler_interval_secs: 1,
            batch: 2,
            pause_ms: 20,
        },
    );
    let server = dep.start();
    let ch = channel(&server).await;
    let report = wait_until_empty(&server, &dep, 1);
    assert_eq!(held_by(&report, 2), (7, 2));
    // Each service key was re-wrapped once, so two records without a key
    // id: the passes after that (at the restart, while idle) found them
    // under the active root and recorded nothing.
    let events: Value = serde_json::from_slice(&cli_ok(
        &server,
        &["--json", "audit", "list", "--operation", "RewrapKeyVersion"],
    ))
    .expect("json");
    let service_key_records = events
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["key_id"].as_str().is_none_or(str::is_empty))
        .count();
    assert_eq!(service_key_records, 2, "{events}");
    for key in &keys {
        for (version, _, epoch) in versions(&ch, key).await {
            assert_eq!(epoch, 2, "{key} v{version} still under epoch {epoch}");
        }
    }
    let disabled = pb::KeyVersionState::Disabled as i32;
    assert_eq!(versions(&ch, &keys[1]).await[0].1, disabled);
    cli_ok(&server, &["key", "enable-version", &keys[1], "1"]);

    // Nothing references epoch 1 any more: it can go.
    let (ok, stderr) = destroy_root(&server, 1);
    assert!(ok, "destroy-root: {stderr}");
    let report = roots(&server);
    assert!(
        report["roots"]
            .as_array()
            .expect("roots")
            .iter()
            .all(|r| r["epoch"] != 1),
        "{report}"
    );
    let (ok, stderr) = destroy_root(&server, 1);
    assert!(!ok && stderr.contains("NOT_FOUND"), "{stderr}");
    decrypt_all(&ch, &made).await;
    drop(ch);
    stop(server);

    // And after a restart (the token now holds root 2 only).
    let server = dep.start();
    let ch = channel(&server).await;
    decrypt_all(&ch, &made).await;
    rotate(&ch, &keys[1]).await;
    let plaintext = b"after the restart".to_vec();
    let blob = encrypt(&ch, &keys[1], &plaintext).await;
    assert_eq!(decrypt(&ch, &blob).await, plaintext);
    stop(server);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkill_during_the_rewrap_job_loses_nothing_and_the_job_resumes() {
    const VERSIONS: u32 = 40;
    let dep = Deployment::new();
    init_root(&dep);
    write_config(
        &dep,
        &Pace {
            scheduler_interval_secs: 1,
            batch: 1,
            pause_ms: 150,
        },
    );
    let server = dep.start();
    let ch = channel(&server).await;
    let key = create_key(&ch).await;
    let mut made: Made = Vec::new();
    for v in 1..=VERSIONS {
        if v > 1 {
            rotate(&ch, &key).await;
        }
        if v % 8 == 1 || v == VERSIONS {
            let plaintext = format!("version {v}").into_bytes();
            made.push((encrypt(&ch, &key, &plaintext).await, plaintext));
        }
    }
    let (ok, stderr) = rotate_root(&dep);
    assert!(ok, "rotate-root: {stderr}");
    cli_ok(&server, &["admin", "reload"]);

    // Kill -9 once the job has made progress.
    let deadline = Instant::now() + Duration::from_secs(120);
    let remaining = loop {
        let (versions, _) = held_by(&roots_logged(&server, &dep), 1);
        if versions < u64::from(VERSIONS) {
            break versions;
        }
        assert!(Instant::now() < deadline, "no progress:\n{}", dep.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut server = server;
    let _ = server.child.kill();
    let _ = server.child.wait();
    eprintln!("killed with {remaining} version(s) left under epoch 1");
    drop(ch);

    let server = dep.start();
    let ch = channel(&server).await;
    // Everything decrypts right after the crash, whichever root holds it.
    decrypt_all(&ch, &made).await;
    let report = wait_until_empty(&server, &dep, 1);
    assert_eq!(held_by(&report, 2), (u64::from(VERSIONS), 2));
    let all = versions(&ch, &key).await;
    assert_eq!(all.len(), VERSIONS as usize);
    assert!(all.iter().all(|v| v.2 == 2), "{all:?}");
    let (ok, stderr) = destroy_root(&server, 1);
    assert!(ok, "destroy-root: {stderr}");
    decrypt_all(&ch, &made).await;
    drop(ch);
    stop(server);
    let server = dep.start();
    let ch = channel(&server).await;
    decrypt_all(&ch, &made).await;
    stop(server);
}

#[test]
fn rotate_root_is_refused_for_a_variant_n_root() {
    let dep = Deployment::new();
    let user = pin_file(&dep, "hsm.pin");
    let (ok, stderr) = ceremony(
        &dep,
        &[
            "init-root",
            "--variant",
            "non-extractable",
            "--user-pin-file",
            &user,
        ],
    );
    assert!(ok, "init-root N: {stderr}");
    let (ok, stderr) = rotate_root(&dep);
    assert!(!ok, "rotating a variant-N root must be refused");
    assert!(
        stderr.contains("root rotation needs trusted wrapping"),
        "{stderr}"
    );
    assert!(stderr.contains("variant N"), "{stderr}");
}

#[test]
fn rotate_root_with_a_bad_so_pin_file_creates_nothing() {
    let dep = Deployment::new();
    init_root(&dep);
    let user = pin_file(&dep, "hsm.pin");

    let wrong = dep.dir.join("wrong-so.pin");
    std::fs::write(&wrong, "not-the-so-pin\n").expect("pin file");
    let wrong = wrong.display().to_string();
    let (ok, stderr) = ceremony(
        &dep,
        &["rotate-root", "--so-pin-file", &wrong, "--pin-file", &user],
    );
    assert!(!ok, "a wrong SO PIN must be refused");
    assert!(stderr.contains("refused a PIN"), "{stderr}");
    assert!(
        !stderr.contains("not-the-so-pin"),
        "the PIN is never echoed"
    );

    let missing = dep.dir.join("no-such.pin").display().to_string();
    let (ok, stderr) = ceremony(
        &dep,
        &[
            "rotate-root",
            "--so-pin-file",
            &missing,
            "--pin-file",
            &user,
        ],
    );
    assert!(!ok, "a missing SO PIN file must be refused");
    assert!(stderr.contains("no-such.pin"), "{stderr}");

    // Nothing was created: the next rotation makes epoch 2.
    let (ok, stderr) = rotate_root(&dep);
    assert!(ok, "rotate-root: {stderr}");
    assert!(stderr.contains("created root key kms-root/2"), "{stderr}");
}

/// A "root" that does not pass the start-up probe (here an ordinary AES key
/// a PIN holder made with OpenSC's pkcs11-tool under the id `kms-root/2`:
/// not trusted, no unwrap template) is never adopted: new versions stay
/// under the verified root, and the impostor can be destroyed (nothing
/// references it).
#[tokio::test(flavor = "multi_thread")]
async fn a_new_root_that_fails_the_probe_is_not_used() {
    let dep = Deployment::new();
    init_root(&dep);
    write_config(
        &dep,
        &Pace {
            scheduler_interval_secs: 3600,
            batch: 8,
            pause_ms: 20,
        },
    );
    let server = dep.start();
    let ch = channel(&server).await;
    let key = create_key(&ch).await;
    let before = encrypt(&ch, &key, b"under root 1").await;

    let status = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(kms_hsm::softhsm2_module_path())
        .args([
            "--token-label",
            "kms-e2e",
            "--login",
            "--pin",
            "user-pin-4321",
        ])
        .args(["--keygen", "--key-type", "AES:32", "--usage-wrap"])
        .args(["--id", &hex::encode(b"kms-root/2"), "--label", "kms-root/2"])
        .env("SOFTHSM2_CONF", dep.dir.join("softhsm2.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("pkcs11-tool (OpenSC, installed by scripts/setup.sh)");
    assert!(status.success(), "pkcs11-tool --keygen");

    // The reload says the new root was not adopted, and why.
    let reply: Value =
        serde_json::from_slice(&cli_ok(&server, &["--json", "admin", "reload"])).expect("json");
    assert_eq!(reply["active_root_epoch"], 1, "{reply}");
    assert!(
        reply["root_refused"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{reply}"
    );
    let report = roots(&server);
    assert_eq!(report["active_epoch"], 1, "{report}");
    rotate(&ch, &key).await;
    let all = versions(&ch, &key).await;
    assert_eq!(all.iter().map(|v| v.2).collect::<Vec<_>>(), vec![1, 1]);
    assert!(
        dep.log().contains("failed its check"),
        "the refusal is logged:\n{}",
        dep.log()
    );

    let (ok, stderr) = destroy_root(&server, 2);
    assert!(ok, "destroy-root 2: {stderr}");
    let report = roots(&server);
    assert!(
        report["roots"]
            .as_array()
            .expect("roots")
            .iter()
            .all(|r| r["epoch"] != 2),
        "{report}"
    );
    assert_eq!(decrypt(&ch, &before).await, b"under root 1");
    drop(ch);
    stop(server);
}
