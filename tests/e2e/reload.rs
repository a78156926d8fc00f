//! Configuration reload of a real `kms serve --config` process: the server
//! certificate rotates under load without a failed request; a CRL revokes
//! one client certificate and not another; a broken reload changes nothing
//! and says why; SIGHUP reloads as the RPC does. Every reload is audited.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kms_proto::v1 as pb;
use kms_proto::v1::admin_client::AdminClient;
use kms_proto::v1::audit_client::AuditClient;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_tests::pki::{CertFiles, TestCa};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use super::configured::{ADMIN, Deployment, Settings, TlsFiles, connect, with_token};

const BILLING: &str = "spiffe://example.org/ns/prod/sa/billing";
const REPORTS: &str = "spiffe://example.org/ns/prod/sa/reports";

async fn create_key(channel: Channel) -> String {
    KeyManagementClient::new(channel)
        .create_key(pb::CreateKeyRequest {
            description: "reload".to_owned(),
            ..Default::default()
        })
        .await
        .expect("CreateKey")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id
}

async fn encrypt(channel: Channel, key: &str) -> Result<(), tonic::Status> {
    CryptoClient::new(channel)
        .encrypt(pb::EncryptRequest {
            key_id: key.to_owned(),
            plaintext: b"payload".to_vec(),
            encryption_context: Default::default(),
        })
        .await
        .map(|_| ())
}

/// Whether a fresh connection through `endpoint` can encrypt (a refused
/// handshake may show up at connect or, with TLS 1.3 client certificates,
/// at the first call).
async fn fresh_connection_works(endpoint: &Endpoint, key: &str) -> bool {
    match connect(endpoint).await {
        Ok(channel) => encrypt(channel, key).await.is_ok(),
        Err(_) => false,
    }
}

async fn reload(channel: Channel) -> Result<pb::ReloadResponse, tonic::Status> {
    AdminClient::new(channel)
        .reload(pb::ReloadRequest {})
        .await
        .map(tonic::Response::into_inner)
}

/// The audit events of Reload, oldest first.
async fn reload_events(channel: Channel) -> Vec<pb::AuditEvent> {
    AuditClient::new(channel)
        .list_audit_events(pb::ListAuditEventsRequest {
            operation: pb::Operation::Reload as i32,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("ListAuditEvents")
        .into_inner()
        .events
}

fn copy_identity(from: &CertFiles, to: &TlsFiles) {
    std::fs::copy(&from.cert, &to.cert).expect("copy cert");
    std::fs::copy(&from.key, &to.key).expect("copy key");
}

fn live_tls(deployment: &Deployment, client_ca: PathBuf) -> TlsFiles {
    TlsFiles {
        cert: deployment.dir.join("server.pem"),
        key: deployment.dir.join("server.key"),
        client_ca,
        crl_files: Vec::new(),
    }
}

/// Loops Encrypt until `stop`: on `channel` (one connection for the whole
/// test) or, without one, each call on a fresh connection. Counts
/// successes; failures are collected.
fn load(
    endpoint: Endpoint,
    channel: Option<Channel>,
    key: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut failures = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let channel = match &channel {
                Some(channel) => channel.clone(),
                None => match connect(&endpoint).await {
                    Ok(channel) => channel,
                    Err(e) => {
                        failures.push(format!("connect: {e:?}"));
                        continue;
                    }
                },
            };
            match encrypt(channel, &key).await {
                Ok(()) => {
                    done.fetch_add(1, Ordering::AcqRel);
                }
                Err(status) => failures.push(format!("encrypt: {status:?}")),
            }
        }
        failures
    })
}

/// Waits (bounded) until every counter has advanced by `by` from now.
async fn advance(counters: &[&AtomicU64], by: u64) {
    let start: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Acquire)).collect();
    for _ in 0..3000 {
        if counters
            .iter()
            .zip(&start)
            .all(|(c, s)| c.load(Ordering::Acquire) >= s + by)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the load made no progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_certificate_rotates_under_load_without_a_failed_request() {
    let deployment = Deployment::new();
    let pki = deployment.dir.join("pki");
    let clients = TestCa::new(&pki, "clients");
    let old_ca = TestCa::new(&pki, "old");
    let new_ca = TestCa::new(&pki, "new");
    let (old_server, new_server) = (old_ca.server(), new_ca.server());
    let admin = clients.client("admin", ADMIN);
    let tls = live_tls(&deployment, clients.ca_file());
    copy_identity(&old_server, &tls);
    deployment.write_config(&Settings {
        tls: Some(tls.clone()),
        ..Settings::default()
    });
    let server = deployment.start();
    let (old_ca_file, new_ca_file) = (old_ca.ca_file(), new_ca.ca_file());
    let trusts_both = server.tls_endpoint(&[&old_ca_file, &new_ca_file], Some(&admin));
    let trusts_old = server.tls_endpoint(&[&old_ca_file], Some(&admin));
    let trusts_new = server.tls_endpoint(&[&new_ca_file], Some(&admin));
    let existing = connect(&trusts_both).await.expect("connect");
    let key = create_key(existing.clone()).await;
    assert!(fresh_connection_works(&trusts_old, &key).await);
    assert!(!fresh_connection_works(&trusts_new, &key).await);

    let stop = Arc::new(AtomicBool::new(false));
    let (on_existing, on_fresh) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let loops = [
        load(
            trusts_both.clone(),
            Some(existing.clone()),
            key.clone(),
            Arc::clone(&stop),
            Arc::clone(&on_existing),
        ),
        load(
            trusts_both.clone(),
            None,
            key.clone(),
            Arc::clone(&stop),
            Arc::clone(&on_fresh),
        ),
    ];
    advance(&[&on_existing, &on_fresh], 5).await;
    copy_identity(&new_server, &tls);
    let reply = reload(existing.clone()).await.expect("Reload");
    assert!(reply.tls);
    assert_eq!(
        Path::new(&reply.config_file),
        deployment.config_file().as_path()
    );
    advance(&[&on_existing, &on_fresh], 5).await;
    stop.store(true, Ordering::Release);
    let mut failures = Vec::new();
    for handle in loops {
        failures.extend(handle.await.expect("load task"));
    }
    assert!(failures.is_empty(), "failed requests: {failures:?}");

    // New connections get the new certificate; the old one is gone.
    assert!(fresh_connection_works(&trusts_new, &key).await);
    assert!(!fresh_connection_works(&trusts_old, &key).await);
    // The connection from before the rotation still works.
    encrypt(existing.clone(), &key)
        .await
        .expect("existing connection");
    let events = reload_events(existing).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].principal, ADMIN);
    assert_eq!(events[0].result_code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_revoked_by_crl_is_refused_after_reload_and_others_are_not() {
    let deployment = Deployment::new();
    let ca = TestCa::new(&deployment.dir.join("pki"), "ca");
    let admin = ca.client("admin", ADMIN);
    let billing = ca.client("billing", BILLING);
    let reports = ca.client("reports", REPORTS);
    let mut tls = live_tls(&deployment, ca.ca_file());
    copy_identity(&ca.server(), &tls);
    let mut settings = Settings {
        tls: Some(tls.clone()),
        ..Settings::default()
    };
    deployment.write_config(&settings);
    let server = deployment.start();
    let ca_file = ca.ca_file();
    let as_admin = server.tls_endpoint(&[&ca_file], Some(&admin));
    let as_billing = server.tls_endpoint(&[&ca_file], Some(&billing));
    let as_reports = server.tls_endpoint(&[&ca_file], Some(&reports));
    let admin_channel = connect(&as_admin).await.expect("admin");
    let key = create_key(admin_channel.clone()).await;
    assert!(fresh_connection_works(&as_billing, &key).await);
    assert!(fresh_connection_works(&as_reports, &key).await);

    tls.crl_files = vec![ca.crl("revoked", &[billing.serial])];
    settings.tls = Some(tls);
    deployment.write_config(&settings);
    let reply = reload(admin_channel.clone()).await.expect("Reload");
    assert_eq!(reply.crl_count, 1);

    assert!(
        !fresh_connection_works(&as_billing, &key).await,
        "the revoked certificate still connects"
    );
    assert!(fresh_connection_works(&as_reports, &key).await);
    assert!(fresh_connection_works(&as_admin, &key).await);
    assert!(
        deployment.log().contains("TLS handshake failed"),
        "the refusal is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_reload_changes_nothing_and_says_why() {
    let deployment = Deployment::new();
    let ca = TestCa::new(&deployment.dir.join("pki"), "ca");
    let admin = ca.client("admin", ADMIN);
    let reports = ca.client("reports", REPORTS);
    let tls = live_tls(&deployment, ca.ca_file());
    copy_identity(&ca.server(), &tls);
    let good = Settings {
        tls: Some(tls.clone()),
        ..Settings::default()
    };
    deployment.write_config(&good);
    let server = deployment.start();
    let ca_file = ca.ca_file();
    let as_admin = server.tls_endpoint(&[&ca_file], Some(&admin));
    let admin_channel = connect(&as_admin).await.expect("admin");
    let key = create_key(admin_channel.clone()).await;

    // Each broken file also drops the administrator: if anything of it
    // were applied, the administrator would lose CreateKey.
    let missing_key = deployment.dir.join("no-such.key");
    let other_ca = TestCa::new(&deployment.dir.join("other-pki"), "other");
    let broken = [
        (
            TlsFiles {
                key: missing_key.clone(),
                ..tls.clone()
            },
            vec![
                "server.tls.key_file".to_owned(),
                missing_key.display().to_string(),
                "No such file or directory".to_owned(),
            ],
        ),
        (
            TlsFiles {
                key: reports.key.clone(),
                ..tls.clone()
            },
            vec!["not a usable pair".to_owned()],
        ),
        (
            TlsFiles {
                crl_files: vec![reports.cert.clone()],
                ..tls.clone()
            },
            vec!["server.tls.crl_files".to_owned()],
        ),
        // A valid CRL, but from another CA: it covers no client CA, so
        // applying it would lock every mTLS client out.
        (
            TlsFiles {
                crl_files: vec![other_ca.crl("other.crl", &[])],
                ..tls.clone()
            },
            vec![
                "server.tls.crl_files".to_owned(),
                "issued none of the configured CRLs".to_owned(),
            ],
        ),
    ];
    for (files, expected) in broken {
        deployment.write_config(&Settings {
            tls: Some(files),
            admins: vec!["spiffe://example.org/nobody".to_owned()],
            ..Settings::default()
        });
        let status = reload(admin_channel.clone())
            .await
            .expect_err("a broken reload");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        for part in expected {
            assert!(status.message().contains(&part), "{part}: {status:?}");
        }
        // Nothing changed: the administrator is one, TLS still serves.
        create_key(admin_channel.clone()).await;
        assert!(fresh_connection_works(&as_admin, &key).await);
    }
    let log = deployment.log();
    assert!(
        log.contains("configuration not reloaded"),
        "the refusal is logged: {log}"
    );

    // A non-administrator may not reload.
    deployment.write_config(&good);
    let as_reports = server.tls_endpoint(&[&ca_file], Some(&reports));
    let status = reload(connect(&as_reports).await.expect("reports"))
        .await
        .expect_err("not an administrator");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let events = reload_events(admin_channel).await;
    let outcomes: Vec<(String, i32)> = events
        .iter()
        .map(|e| (e.principal.clone(), e.result_code))
        .collect();
    let failed = Code::FailedPrecondition as i32;
    assert_eq!(
        outcomes,
        [
            (ADMIN.to_owned(), failed),
            (ADMIN.to_owned(), failed),
            (ADMIN.to_owned(), failed),
            (ADMIN.to_owned(), failed),
            (REPORTS.to_owned(), Code::PermissionDenied as i32),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_configuration() {
    let deployment = Deployment::new();
    let mut settings = Settings {
        admins: vec!["job-a".to_owned()],
        tokens: vec![("job-a".to_owned(), "kms_token-of-job-a".to_owned())],
        ..Settings::default()
    };
    deployment.write_config(&settings);
    let mut server = deployment.start();
    let channel = connect(&server.plain_endpoint()).await.expect("connect");
    let key = KeyManagementClient::new(channel.clone())
        .create_key(with_token(
            pb::CreateKeyRequest::default(),
            "kms_token-of-job-a",
        ))
        .await
        .expect("CreateKey")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id;
    let encrypt_as = |token: &'static str| {
        let channel = channel.clone();
        let key = key.clone();
        async move {
            CryptoClient::new(channel)
                .encrypt(with_token(
                    pb::EncryptRequest {
                        key_id: key,
                        plaintext: b"x".to_vec(),
                        encryption_context: Default::default(),
                    },
                    token,
                ))
                .await
        }
    };
    let refused = encrypt_as("kms_token-of-job-b").await.expect_err("unknown");
    assert_eq!(refused.code(), Code::Unauthenticated);

    settings
        .tokens
        .push(("job-b".to_owned(), "kms_token-of-job-b".to_owned()));
    deployment.write_config(&settings);
    server.signal("HUP");
    let mut accepted = false;
    for _ in 0..1000 {
        if encrypt_as("kms_token-of-job-b").await.is_ok() {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        server.wait_for_exit(Duration::ZERO).is_none(),
        "SIGHUP ended the server"
    );
    assert!(accepted, "the new token was never accepted");
    encrypt_as("kms_token-of-job-a").await.expect("job-a still");

    let events = AuditClient::new(channel)
        .list_audit_events(with_token(
            pb::ListAuditEventsRequest {
                operation: pb::Operation::Reload as i32,
                ..Default::default()
            },
            "kms_token-of-job-a",
        ))
        .await
        .expect("ListAuditEvents")
        .into_inner()
        .events;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].principal, "system");
    assert_eq!(events[0].result_code, 0);
}

#[test]
fn a_server_without_a_configuration_file_refuses_to_reload() {
    let data = tempfile::tempdir().expect("tmp");
    let server = kms_tests::DevServerProcess::start(data.path());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let status = runtime
        .block_on(async {
            let channel = connect(&Endpoint::from_shared(server.endpoint()).expect("endpoint"))
                .await
                .expect("connect");
            reload(channel).await
        })
        .expect_err("dev mode");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("without a configuration file"),
        "{status:?}"
    );
}

/// An audit stream was authorized when it opened; a reload that takes the
/// watcher's token and role away must end it, not let it read on. Before:
/// the stream kept delivering every new event after the reload.
#[tokio::test]
async fn a_reload_ends_open_audit_streams_so_revoked_watchers_stop_reading() {
    let deployment = Deployment::new();
    let mut settings = Settings {
        admins: vec!["job-a".to_owned(), "watcher".to_owned()],
        tokens: vec![
            ("job-a".to_owned(), "kms_token-of-job-a".to_owned()),
            ("watcher".to_owned(), "kms_token-of-watcher".to_owned()),
        ],
        ..Settings::default()
    };
    deployment.write_config(&settings);
    let mut server = deployment.start();
    let channel = connect(&server.plain_endpoint()).await.expect("connect");
    let mut stream = AuditClient::new(channel.clone())
        .watch_audit_events(with_token(
            pb::WatchAuditEventsRequest { from_sequence: 1 },
            "kms_token-of-watcher",
        ))
        .await
        .expect("watch")
        .into_inner();
    // The stream works: it delivers its own audit record.
    let first = tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .expect("an event")
        .expect("stream ok");
    assert!(first.is_some());

    settings.admins = vec!["job-a".to_owned()];
    settings
        .tokens
        .retain(|(principal, _)| principal != "watcher");
    deployment.write_config(&settings);
    server.signal("HUP");

    // The stream ends with UNAVAILABLE (reconnect), delivering nothing newer.
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("the stream ends after the reload")
        {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("reloaded"), "{ended:?}");
    // Reconnecting with the revoked token is refused.
    let again = AuditClient::new(channel.clone())
        .watch_audit_events(with_token(
            pb::WatchAuditEventsRequest { from_sequence: 1 },
            "kms_token-of-watcher",
        ))
        .await
        .expect_err("revoked token");
    assert_eq!(again.code(), Code::Unauthenticated, "{again:?}");
    server.signal("TERM");
    let _ = server.wait_for_exit(Duration::from_secs(60));
}

/// A reload that would leave no administrator is refused; a file that
/// changes settings read only at start is applied for the rest and says
/// which settings wait for a restart, instead of ignoring them silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_restart_only_settings_and_keeps_an_administrator() {
    let deployment = Deployment::new();
    let mut settings = Settings {
        admins: vec!["job-a".to_owned()],
        tokens: vec![("job-a".to_owned(), "kms_token-of-job-a".to_owned())],
        ..Settings::default()
    };
    deployment.write_config(&settings);
    let server = deployment.start();
    let channel = connect(&server.plain_endpoint()).await.expect("connect");
    let reload_as_a = || {
        let channel = channel.clone();
        async move {
            AdminClient::new(channel)
                .reload(with_token(pb::ReloadRequest {}, "kms_token-of-job-a"))
                .await
                .map(tonic::Response::into_inner)
        }
    };

    // Unchanged file: nothing waits for a restart.
    let reply = reload_as_a().await.expect("reload");
    assert!(reply.restart_required.is_empty(), "{reply:?}");

    // No administrator left: refused, and job-a is still one.
    deployment.write_config(&Settings {
        admins: Vec::new(),
        ..settings.clone()
    });
    let status = reload_as_a().await.expect_err("admins = []");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("auth.admins"), "{status:?}");

    // Restart-only settings changed, a reloadable one too: the token is
    // added now; the others are named.
    settings.shutdown_grace_ms += 1_000;
    settings.request_timeout_ms += 1_000;
    settings
        .tokens
        .push(("job-b".to_owned(), "kms_token-of-job-b".to_owned()));
    deployment.write_config(&settings);
    let reply = reload_as_a().await.expect("reload");
    assert_eq!(
        reply.restart_required,
        ["server.request_timeout_ms", "server.shutdown_grace_ms"],
        "{reply:?}"
    );
    assert_eq!(reply.token_count, 2);
    assert!(
        deployment
            .log()
            .contains("changed settings are not in force until the server restarts"),
        "{}",
        deployment.log()
    );
}
