//! The Kubernetes KMS v2 plugin (issue 16), end to end: a real kms with a
//! `[[kubernetes]]` Unix socket, and a client that speaks exactly the
//! published Kubernetes API (tests/scripts/kubernetes_kms_client.py, whose
//! stubs grpcio-tools generates at run time from
//! proto/k8s.io/kms/apis/v2/api.proto) acting as kube-apiserver; plus a
//! tonic client of the same API against `kms serve --dev
//! --kubernetes-socket`.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use kms::config::{Config, KubernetesListener};
use kms::service::KmsService;
use kms_proto::kubernetes_v2 as k8s;
use kms_proto::kubernetes_v2::key_management_service_client::KeyManagementServiceClient;
use kms_proto::v1 as pb;
use kms_tests::{TestEnv, TestServer};
use serde_json::{Value, json};
use tonic::transport::Channel;

use super::{create_key, decrypt};

const CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/scripts/kubernetes_kms_client.py"
);
const PROTO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../proto/k8s.io/kms/apis/v2/api.proto"
);
const ALIAS: &str = "alias/kubernetes";

/// Runs the Python stand-in for kube-apiserver with `calls` (one channel,
/// in order) and returns one result per call. Async: the server under test
/// runs on this runtime.
async fn apiserver(socket: &Path, calls: Value) -> Vec<Value> {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new("python3")
        .arg(CLIENT)
        .arg("--proto")
        .arg(PROTO)
        .arg("--socket")
        .arg(socket)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python3 (scripts/setup.sh installs grpcio and grpcio-tools)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(calls.to_string().as_bytes())
        .await
        .expect("write calls");
    drop(stdin);
    let output = child.wait_with_output().await.expect("python output");
    assert!(
        output.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&output.stdout).expect("JSON results");
    assert_eq!(results.len(), calls.as_array().map_or(0, Vec::len));
    results
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn unb64(value: &Value) -> Vec<u8> {
    B64.decode(value.as_str().expect("base64 string"))
        .expect("base64")
}

fn code(result: &Value) -> &str {
    result["code"].as_str().expect("code")
}

fn message(result: &Value) -> &str {
    result["message"].as_str().unwrap_or_default()
}

/// A 32-byte DEK seed, as kube-apiserver generates one.
fn seed() -> Vec<u8> {
    use std::io::Read as _;
    let mut seed = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .expect("random seed");
    seed
}

/// This process's uid (the principal the server sees: `unix:uid=<uid>`).
fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").expect("/proc/self").uid()
}

fn listener(socket: &Path) -> KubernetesListener {
    KubernetesListener {
        socket: socket.to_owned(),
        key: ALIAS.to_owned(),
        owner_uid: None,
        group_gid: None,
        mode: kms::config::DEFAULT_SOCKET_MODE,
    }
}

fn plugin_config(env: &TestEnv, socket: &Path) -> Config {
    let mut config = env.config();
    config.kubernetes = vec![listener(socket)];
    config
}

/// Creates the plugin's key with its alias; returns the key id.
async fn create_plugin_key(server: &TestServer) -> String {
    let key = create_key(server, "kubernetes").await;
    server
        .keys()
        .create_alias(pb::CreateAliasRequest {
            alias_name: ALIAS.into(),
            target_key_id: key.clone(),
        })
        .await
        .expect("alias");
    key
}

async fn rotate(server: &TestServer, key: &str) {
    server
        .keys()
        .rotate_key(pb::RotateKeyRequest {
            key_id: key.to_owned(),
        })
        .await
        .expect("rotate");
}

async fn audit_events(server: &TestServer, operation: pb::Operation) -> Vec<pb::AuditEvent> {
    server
        .audit()
        .list_audit_events(pb::ListAuditEventsRequest {
            operation: operation as i32,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list audit events")
        .into_inner()
        .events
}

fn event<'a>(events: &'a [pb::AuditEvent], request_id: &str) -> &'a pb::AuditEvent {
    events
        .iter()
        .find(|e| e.request_id == request_id)
        .unwrap_or_else(|| panic!("no audit record with request id {request_id}: {events:?}"))
}

fn encrypt_call(plaintext: &[u8], uid: &str) -> Value {
    json!({"rpc": "Encrypt", "plaintext": b64(plaintext), "uid": uid})
}

fn decrypt_call(ciphertext: &[u8], key_id: &str, uid: &str) -> Value {
    json!({"rpc": "Decrypt", "ciphertext": b64(ciphertext), "key_id": key_id, "uid": uid})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apiserver_round_trips_seeds_across_a_rotation_and_a_disabled_version_fails() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().expect("socket dir");
    let socket = dir.path().join("kms.sock");
    let server = env.start_with(plugin_config(&env, &socket)).await;
    let key = create_plugin_key(&server).await;
    let v1 = format!("{key}/v1");
    let v2 = format!("{key}/v2");

    let seed1 = seed();
    let r = apiserver(
        &socket,
        json!([{"rpc": "Status"}, encrypt_call(&seed1, "uid-enc-1")]),
    )
    .await;
    assert_eq!(
        (
            code(&r[0]),
            &r[0]["version"],
            &r[0]["healthz"],
            &r[0]["key_id"]
        ),
        ("OK", &json!("v2"), &json!("ok"), &json!(v1)),
        "{r:?}"
    );
    assert_eq!((code(&r[1]), &r[1]["key_id"]), ("OK", &json!(v1)), "{r:?}");
    assert_eq!(r[1]["annotations"], json!({}));
    let blob1 = unb64(&r[1]["ciphertext"]);
    assert!(!blob1.is_empty() && blob1.len() <= 1024, "{}", blob1.len());

    // A rotation changes the key id Status reports (the apiserver re-seeds);
    // the old blob still decrypts under its own key id.
    rotate(&server, &key).await;
    let seed2 = seed();
    let r = apiserver(
        &socket,
        json!([
            {"rpc": "Status"},
            encrypt_call(&seed2, "uid-enc-2"),
            decrypt_call(&blob1, &v1, "uid-dec-1"),
        ]),
    )
    .await;
    assert_eq!(
        (&r[0]["healthz"], &r[0]["key_id"]),
        (&json!("ok"), &json!(v2))
    );
    assert_eq!((code(&r[1]), &r[1]["key_id"]), ("OK", &json!(v2)), "{r:?}");
    let blob2 = unb64(&r[1]["ciphertext"]);
    assert_eq!(code(&r[2]), "OK", "{r:?}");
    assert_eq!(unb64(&r[2]["plaintext"]), seed1);

    // A key id that does not name the blob's key version exactly is refused
    // generically, whatever is wrong with it.
    let r = apiserver(
        &socket,
        json!([
            decrypt_call(&blob2, &v2, "uid-dec-2"),
            decrypt_call(&blob1, &v2, "uid-mismatch-version"),
            decrypt_call(&blob1, ALIAS, "uid-mismatch-alias"),
            decrypt_call(&blob1, &format!("{key}/v01"), "uid-mismatch-form"),
        ]),
    )
    .await;
    assert_eq!(unb64(&r[0]["plaintext"]), seed2);
    for refused in &r[1..] {
        assert_eq!(code(refused), "INVALID_ARGUMENT", "{refused:?}");
        assert_eq!(message(refused), "invalid ciphertext", "{refused:?}");
        assert!(refused.get("plaintext").is_none());
    }

    // The blobs are bound to the plugin's encryption context: Crypto.Decrypt
    // needs it named.
    let refused = decrypt(&server, &blob1, &[]).await.expect_err("no context");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let opened = decrypt(&server, &blob1, &[("kms.kubernetes.io/plugin", "v2")])
        .await
        .expect("with the plugin's context");
    assert_eq!(opened.plaintext, seed1);

    // A disabled version fails with an error the apiserver logs, no plaintext;
    // the others keep working.
    server
        .keys()
        .disable_key_version(pb::DisableKeyVersionRequest {
            key_id: key.clone(),
            version: 1,
        })
        .await
        .expect("disable v1");
    let r = apiserver(
        &socket,
        json!([
            decrypt_call(&blob1, &v1, "uid-dec-disabled"),
            decrypt_call(&blob2, &v2, "uid-dec-3"),
            {"rpc": "Status"},
        ]),
    )
    .await;
    assert_eq!(code(&r[0]), "FAILED_PRECONDITION", "{r:?}");
    assert!(message(&r[0]).contains("disabled"), "{r:?}");
    assert!(r[0].get("plaintext").is_none());
    assert_eq!(unb64(&r[1]["plaintext"]), seed2);
    assert_eq!(
        (&r[2]["healthz"], &r[2]["key_id"]),
        (&json!("ok"), &json!(v2))
    );

    // Every call is in the audit log, under operations of its own, with the
    // request's uid, the caller's peer credentials and the key version.
    let principal = format!("unix:uid={}", my_uid());
    let encrypts = audit_events(&server, pb::Operation::KubernetesEncrypt).await;
    assert_eq!(encrypts.len(), 2, "{encrypts:?}");
    let first = event(&encrypts, "uid-enc-1");
    assert_eq!(first.principal, principal);
    assert!(first.peer.starts_with("unix:gid="), "{}", first.peer);
    assert!(first.peer.contains(",pid="), "{}", first.peer);
    assert_eq!(
        (first.key_id.as_str(), first.key_version),
        (key.as_str(), 1)
    );
    assert_eq!(first.result_code, 0);
    assert_eq!(first.context_digest.len(), 32);
    assert_eq!(event(&encrypts, "uid-enc-2").key_version, 2);
    let decrypts = audit_events(&server, pb::Operation::KubernetesDecrypt).await;
    assert_eq!(decrypts.len(), 7, "{decrypts:?}");
    let disabled = event(&decrypts, "uid-dec-disabled");
    assert_eq!(
        (disabled.result_code, disabled.key_version),
        (tonic::Code::FailedPrecondition as i32, 1)
    );
    let mismatch = event(&decrypts, "uid-mismatch-version");
    assert_eq!(
        (
            mismatch.result_code,
            mismatch.key_id.as_str(),
            mismatch.key_version
        ),
        (tonic::Code::InvalidArgument as i32, key.as_str(), 1)
    );
    let statuses = audit_events(&server, pb::Operation::KubernetesStatus).await;
    assert_eq!(statuses.len(), 3, "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|e| e.principal == principal && e.result_code == 0 && e.key_id == key)
    );
    assert_eq!(
        statuses.iter().map(|e| e.key_version).collect::<Vec<_>>(),
        [1, 2, 2]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_requests_are_refused_naming_the_limit_and_audited() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().expect("socket dir");
    let socket = dir.path().join("kms.sock");
    let server = env.start_with(plugin_config(&env, &socket)).await;
    let key = create_plugin_key(&server).await;
    let r = apiserver(&socket, json!([encrypt_call(&seed(), "uid-ok")])).await;
    let blob = unb64(&r[0]["ciphertext"]);
    let key_id = format!("{key}/v1");
    let annotated = |annotations: Value, uid: &str| {
        json!({"rpc": "Decrypt", "ciphertext": b64(&blob), "key_id": key_id, "uid": uid,
               "annotations": annotations})
    };
    let big = b64(&vec![7u8; 32 * 1024 - "a.example.org".len() + 1]);
    let fits = b64(&vec![7u8; 32 * 1024 - "a.example.org".len()]);
    let r = apiserver(
        &socket,
        json!([
            encrypt_call(&[1u8; 925], "lim-plaintext"),
            encrypt_call(&[], "lim-empty"),
            decrypt_call(&[1u8; 1025], &key_id, "lim-ciphertext"),
            decrypt_call(&blob, &"k".repeat(1025), "lim-key-id"),
            annotated(json!({"Not_A_Domain": b64(b"x")}), "lim-fqdn"),
            annotated(json!({"localhost": b64(b"x")}), "lim-one-label"),
            annotated(json!({"a.example.org": big}), "lim-annotations"),
            // Exactly at the limits: accepted (kms itself returns no
            // annotations, and ignores the ones it is given).
            annotated(json!({"a.example.org": fits}), "at-limit"),
            encrypt_call(&[1u8; 924], "at-plaintext-limit"),
        ]),
    )
    .await;
    let expected = [
        ("lim-plaintext", "plaintext", "924"),
        ("lim-empty", "plaintext", "924"),
        ("lim-ciphertext", "ciphertext", "1024"),
        ("lim-key-id", "key_id", "1024"),
        ("lim-fqdn", "annotations", "fully qualified domain name"),
        (
            "lim-one-label",
            "annotations",
            "fully qualified domain name",
        ),
        ("lim-annotations", "annotations", "32768"),
    ];
    for (result, (uid, field, limit)) in r.iter().zip(expected) {
        assert_eq!(code(result), "INVALID_ARGUMENT", "{uid}: {result:?}");
        let text = message(result);
        assert!(
            text.contains(field) && text.contains(limit),
            "{uid}: {text}"
        );
        assert!(text.contains("Kubernetes KMS v2 limit"), "{uid}: {text}");
    }
    assert_eq!(code(&r[7]), "OK", "{:?}", r[7]);
    assert_eq!(code(&r[8]), "OK", "{:?}", r[8]);
    assert!(unb64(&r[8]["ciphertext"]).len() <= 1024);

    let mut events = audit_events(&server, pb::Operation::KubernetesEncrypt).await;
    events.extend(audit_events(&server, pb::Operation::KubernetesDecrypt).await);
    for (uid, _, _) in expected {
        assert_eq!(
            event(&events, uid).result_code,
            tonic::Code::InvalidArgument as i32,
            "{uid}"
        );
    }
    // A malformed key_id (1 KiB of anything) is not copied into the log.
    assert_eq!(event(&events, "lim-key-id").key_id, "");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_goes_unhealthy_while_the_token_is_gone_and_recovers() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let env = TestEnv::new();
    let dir = tempfile::tempdir().expect("socket dir");
    let socket = dir.path().join("kms.sock");
    let server = env.start_with(plugin_config(&env, &socket)).await;
    let key = create_plugin_key(&server).await;
    let r = apiserver(&socket, json!([{"rpc": "Status"}])).await;
    assert_eq!(r[0]["healthz"], json!("ok"), "{r:?}");
    // Past the cached HSM round trip, so that the next Status makes a new one.
    tokio::time::sleep(kms::service::kubernetes::STATUS_CACHE_TTL).await;

    // The token directory goes away (a pulled HSM) and comes back soon, as
    // in e2e::health (the server's own probe sees it go first).
    let token_dir = env.token_dir().to_owned();
    let moved: PathBuf = token_dir.with_extension("gone");
    std::fs::rename(&token_dir, &moved).expect("move the token away");
    super::health::wait_for(
        &server,
        "kms.v1.Crypto",
        ServingStatus::NotServing,
        std::time::Duration::from_secs(30),
    )
    .await;
    let r = apiserver(&socket, json!([{"rpc": "Status"}])).await;
    std::fs::rename(&moved, &token_dir).expect("restore the token");
    // A short reason, the same API version, and still the current key id.
    assert_eq!(code(&r[0]), "OK", "{r:?}");
    assert_eq!(r[0]["healthz"], json!("the HSM is unavailable"), "{r:?}");
    assert_eq!(r[0]["version"], json!("v2"));
    assert_eq!(r[0]["key_id"], json!(format!("{key}/v1")));

    // Back: Status says so again (within the cache period), without a restart.
    let r = apiserver(
        &socket,
        json!([
            {"rpc": "StatusUntil", "healthz_ok": true, "timeout_s": 30},
            encrypt_call(&seed(), "after-outage"),
        ]),
    )
    .await;
    assert_eq!(r[0]["healthz"], json!("ok"), "{r:?}");
    assert_eq!(code(&r[1]), "OK", "{r:?}");

    // The unhealthy answer is in the audit log as what it was.
    let statuses = audit_events(&server, pb::Operation::KubernetesStatus).await;
    assert!(
        statuses
            .iter()
            .any(|e| e.result_code == tonic::Code::Unavailable as i32),
        "{statuses:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_the_key_policy_does_not_allow_is_denied_and_audited() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().expect("socket dir");
    let socket = dir.path().join("kms.sock");
    let server = env.start_with(plugin_config(&env, &socket)).await;
    let key = create_plugin_key(&server).await;
    let me = format!("unix:uid={}", my_uid());
    let other = format!("unix:uid={}", my_uid().wrapping_add(4242));
    let put_policy = |principal: String| {
        let mut keys = server.keys();
        let key = key.clone();
        async move {
            keys.put_key_policy(pb::PutKeyPolicyRequest {
                key_id: key,
                policy: Some(pb::KeyPolicy {
                    grants: vec![pb::Grant {
                        principal,
                        required_encryption_context: Default::default(),
                        permissions: vec![
                            pb::Permission::Encrypt as i32,
                            pb::Permission::Decrypt as i32,
                        ],
                    }],
                }),
            })
            .await
            .expect("put policy");
        }
    };
    // Only another uid may use the key.
    put_policy(other).await;
    let r = apiserver(
        &socket,
        json!([encrypt_call(&seed(), "uid-denied"), {"rpc": "Status"}]),
    )
    .await;
    assert_eq!(code(&r[0]), "PERMISSION_DENIED", "{r:?}");
    assert!(message(&r[0]).contains(&me), "{r:?}");
    assert!(r[0].get("ciphertext").is_none());
    let healthz = r[1]["healthz"].as_str().expect("healthz");
    assert!(healthz.contains("not allowed"), "{healthz}");

    let events = audit_events(&server, pb::Operation::KubernetesEncrypt).await;
    let denied = event(&events, "uid-denied");
    assert_eq!(denied.principal, me);
    assert_eq!(denied.key_id, key);
    assert_eq!(denied.result_code, tonic::Code::PermissionDenied as i32);
    let statuses = audit_events(&server, pb::Operation::KubernetesStatus).await;
    assert_eq!(
        statuses.last().map(|e| e.result_code),
        Some(tonic::Code::PermissionDenied as i32)
    );

    // The same caller, once the policy names its uid: allowed.
    put_policy(me.clone()).await;
    let r = apiserver(
        &socket,
        json!([encrypt_call(
            b"0123456789abcdef0123456789abcdef",
            "uid-allowed"
        )]),
    )
    .await;
    assert_eq!(code(&r[0]), "OK", "{r:?}");
    let blob = unb64(&r[0]["ciphertext"]);
    let key_id = r[0]["key_id"].as_str().expect("key_id").to_owned();
    let r = apiserver(
        &socket,
        json!([decrypt_call(&blob, &key_id, "uid-allowed-2")]),
    )
    .await;
    assert_eq!(
        unb64(&r[0]["plaintext"]),
        b"0123456789abcdef0123456789abcdef"
    );
    server.stop().await;
}

/// Opens a service and tries to start a server with `config` (whose token
/// and directories the caller keeps alive).
async fn try_start(config: Config) -> Result<kms::server::RunningServer, String> {
    let open = config.clone();
    let service = tokio::task::spawn_blocking(move || KmsService::open(&open))
        .await
        .expect("join")
        .expect("open service");
    kms::server::start(&config, Arc::new(service))
        .await
        .map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_replaces_only_a_stale_socket_and_is_removed_at_shutdown() {
    let dir = tempfile::tempdir().expect("socket dir");
    let socket = dir.path().join("kms.sock");
    // A crashed run left its socket behind: nothing listens on it.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    assert!(socket.exists());

    let env = TestEnv::new();
    let server = env.start_with(plugin_config(&env, &socket)).await;
    create_plugin_key(&server).await;
    let meta = std::fs::symlink_metadata(&socket).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(meta.uid(), my_uid());
    let r = apiserver(&socket, json!([{"rpc": "Status"}])).await;
    assert_eq!(r[0]["healthz"], json!("ok"), "{r:?}");

    // A second kms cannot take a socket that is in use; the first keeps it.
    let other = TestEnv::new();
    let refused = try_start(plugin_config(&other, &socket))
        .await
        .expect_err("socket in use");
    assert!(refused.contains("in use"), "{refused}");
    assert!(refused.contains("kms.sock"), "{refused}");
    let r = apiserver(&socket, json!([{"rpc": "Status"}])).await;
    assert_eq!(r[0]["healthz"], json!("ok"), "{r:?}");

    // A clean shutdown removes the socket it created.
    server.stop().await;
    assert!(!socket.exists(), "socket left behind");

    // A regular file at the path is never replaced.
    std::fs::write(&socket, b"not a socket").expect("regular file");
    let refused = try_start(plugin_config(&other, &socket))
        .await
        .expect_err("regular file");
    assert!(refused.contains("not a socket"), "{refused}");
    assert_eq!(std::fs::read(&socket).expect("kept"), b"not a socket");
    std::fs::remove_file(&socket).expect("remove");

    // Owner, group and mode as configured (changing the owner needs root).
    let mut config = plugin_config(&other, &socket);
    let root = my_uid() == 0;
    config.kubernetes[0].mode = 0o660;
    if root {
        config.kubernetes[0].owner_uid = Some(65534);
        config.kubernetes[0].group_gid = Some(65534);
    }
    let server = try_start(config).await.expect("start");
    let meta = std::fs::symlink_metadata(&socket).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    if root {
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    }
    // A socket another process put in its place is not ours to delete.
    std::fs::remove_file(&socket).expect("remove ours");
    let foreign = std::os::unix::net::UnixListener::bind(&socket).expect("foreign socket");
    server.shutdown().await.expect("shutdown");
    assert!(socket.exists(), "a socket kms did not create was deleted");
    drop(foreign);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_every_plugin_ciphertext_decryptable() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().expect("socket dir");
    let socket = dir.path().join("kms.sock");
    let server = env.start_with(plugin_config(&env, &socket)).await;
    let key = create_plugin_key(&server).await;
    let (seed1, seed2) = (seed(), seed());
    let r1 = apiserver(&socket, json!([encrypt_call(&seed1, "before-1")])).await;
    rotate(&server, &key).await;
    let r2 = apiserver(&socket, json!([encrypt_call(&seed2, "before-2")])).await;
    server.stop().await;

    let server = env.start_with(plugin_config(&env, &socket)).await;
    let r = apiserver(
        &socket,
        json!([
            {"rpc": "Status"},
            decrypt_call(&unb64(&r1[0]["ciphertext"]), r1[0]["key_id"].as_str().expect("id"), "after-1"),
            decrypt_call(&unb64(&r2[0]["ciphertext"]), r2[0]["key_id"].as_str().expect("id"), "after-2"),
        ]),
    )
    .await;
    assert_eq!(
        (&r[0]["healthz"], &r[0]["key_id"]),
        (&json!("ok"), &json!(format!("{key}/v2")))
    );
    assert_eq!(unb64(&r[1]["plaintext"]), seed1);
    assert_eq!(unb64(&r[2]["plaintext"]), seed2);
    let report = server.service().verify_chain(None).expect("verify");
    assert!(report.records > 0);
    server.stop().await;
}

/// A tonic channel over a Unix socket.
async fn unix_channel(socket: PathBuf) -> Channel {
    tonic::transport::Endpoint::try_from("http://kms.invalid")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connect over the Unix socket")
}

/// `kms serve --dev --kubernetes-socket PATH` as a child process; returns it
/// with its TCP endpoint once it printed its banner.
fn dev_server(data: &Path, socket: &Path) -> (std::process::Child, String) {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(kms_tests::kms_binary())
        .args(["serve", "--dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .arg("--kubernetes-socket")
        .arg(socket)
        .env("KMS_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kms serve --dev");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("banner");
    let addr = line
        .strip_prefix("kms listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected banner {line:?}"))
        .to_owned();
    (child, format!("http://{addr}"))
}

fn terminate(child: &mut std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_serves_the_plugin_api_to_a_tonic_client_and_keeps_its_key() {
    let data = tempfile::tempdir().expect("data dir");
    let dir = tempfile::tempdir().expect("socket dir");
    let socket = dir.path().join("kms.sock");
    let (mut child, endpoint) = dev_server(data.path(), &socket);
    let mut plugin = KeyManagementServiceClient::new(unix_channel(socket.clone()).await);

    let status = plugin
        .status(k8s::StatusRequest {})
        .await
        .expect("Status")
        .into_inner();
    assert_eq!(
        (status.version.as_str(), status.healthz.as_str()),
        ("v2", "ok")
    );
    // alias/kubernetes was created on first use; the key id names its version.
    let keys = kms_proto::v1::key_management_client::KeyManagementClient::connect(endpoint)
        .await
        .expect("TCP")
        .describe_key(pb::DescribeKeyRequest {
            key_id: ALIAS.into(),
        })
        .await
        .expect("alias/kubernetes exists")
        .into_inner()
        .key_metadata
        .expect("metadata");
    assert_eq!(status.key_id, format!("{}/v1", keys.key_id));

    let seed = seed();
    let encrypted = plugin
        .encrypt(k8s::EncryptRequest {
            plaintext: seed.clone(),
            uid: "tonic-1".into(),
        })
        .await
        .expect("Encrypt")
        .into_inner();
    assert_eq!(encrypted.key_id, status.key_id);
    assert!(encrypted.annotations.is_empty());
    let decrypted = plugin
        .decrypt(k8s::DecryptRequest {
            ciphertext: encrypted.ciphertext.clone(),
            uid: "tonic-2".into(),
            key_id: encrypted.key_id.clone(),
            annotations: Default::default(),
        })
        .await
        .expect("Decrypt")
        .into_inner();
    assert_eq!(decrypted.plaintext, seed);
    let refused = plugin
        .decrypt(k8s::DecryptRequest {
            ciphertext: vec![0; 2000],
            uid: "tonic-3".into(),
            key_id: encrypted.key_id.clone(),
            annotations: Default::default(),
        })
        .await
        .expect_err("over the limit");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("1024"), "{refused:?}");
    drop(plugin);

    // A graceful stop removes the socket; a restart serves the same key (not
    // a new one) and the old blob still decrypts.
    terminate(&mut child);
    assert!(!socket.exists(), "socket left behind after SIGTERM");
    let (mut child, _) = dev_server(data.path(), &socket);
    let mut plugin = KeyManagementServiceClient::new(unix_channel(socket.clone()).await);
    let again = plugin
        .status(k8s::StatusRequest {})
        .await
        .expect("Status")
        .into_inner();
    assert_eq!(again.key_id, status.key_id);
    let decrypted = plugin
        .decrypt(k8s::DecryptRequest {
            ciphertext: encrypted.ciphertext,
            uid: "tonic-4".into(),
            key_id: encrypted.key_id,
            annotations: Default::default(),
        })
        .await
        .expect("Decrypt after restart")
        .into_inner();
    assert_eq!(decrypted.plaintext, seed);
    drop(plugin);
    terminate(&mut child);
}
