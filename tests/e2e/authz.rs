//! Authentication and authorization over real TLS/mTLS: who may call, who may
//! use which key, the encryption-context condition, cross-key blob confusion,
//! separation of duties, and the audit trail of every denial.

use std::collections::HashMap;
use std::path::Path;

use kms::auth::tokens::token_digest;
use kms::config::{AuthSettings, Config, TlsSettings};
use kms_proto::v1 as pb;
use kms_proto::v1::audit_client::AuditClient;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_storage::KeyPolicy;
use kms_tests::pki::{CertFiles, TestCa};
use kms_tests::{TestEnv, TestServer};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request, Status};

const ADMIN: &str = "spiffe://test.kms/ops/admin";
const AUDITOR: &str = "spiffe://test.kms/security/auditor";
const ENCRYPTER: &str = "spiffe://test.kms/ns/prod/sa/encrypter";
const DECRYPTER: &str = "spiffe://test.kms/ns/prod/sa/decrypter";
const RE_ENCRYPTER: &str = "spiffe://test.kms/ns/prod/sa/re-encrypter";
const STRANGER: &str = "spiffe://test.kms/ns/prod/sa/stranger";
const TOKEN_PRINCIPAL: &str = "batch-job";
const TOKEN: &str = "kms_test-token-0123456789abcdefghijklmnopqrstuvw";

/// Adds a bearer token to every call.
#[derive(Clone)]
struct Bearer(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Conn = InterceptedService<Channel, Bearer>;

struct Pki {
    ca: TestCa,
    rogue_ca: TestCa,
    server: CertFiles,
    clients: HashMap<&'static str, CertFiles>,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let ca = TestCa::new(dir, "kms");
        let rogue_ca = TestCa::new(dir, "rogue");
        let server = ca.server();
        let clients = [ADMIN, AUDITOR, ENCRYPTER, DECRYPTER, RE_ENCRYPTER, STRANGER]
            .into_iter()
            .enumerate()
            .map(|(i, p)| (p, ca.client(&format!("client{i}"), p)))
            .collect();
        Pki {
            ca,
            rogue_ca,
            server,
            clients,
        }
    }
}

fn secure_config(env: &TestEnv, pki: &Pki) -> Config {
    let mut config = env.config();
    config.server.tls = Some(TlsSettings {
        cert_file: pki.server.cert.clone(),
        key_file: pki.server.key.clone(),
        client_ca_file: Some(pki.ca.ca_file()),
        // Token callers connect without a certificate.
        client_cert_required: false,
        crl_files: Vec::new(),
    });
    config.auth = AuthSettings {
        admins: vec![ADMIN.to_owned()],
        auditors: vec![AUDITOR.to_owned()],
        anonymous_principal: None,
        tokens: vec![(TOKEN_PRINCIPAL.to_owned(), token_digest(TOKEN.as_bytes()))],
        default_policy: KeyPolicy::default(),
    };
    config
}

async fn connect(
    server: &TestServer,
    ca_file: &Path,
    client: Option<&CertFiles>,
    token: Option<&str>,
) -> Result<Conn, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca_file).expect("ca")))
        .domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&client.cert).expect("cert"),
            std::fs::read(&client.key).expect("key"),
        ));
    }
    let channel = Channel::from_shared(server.endpoint.clone())
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await?;
    let bearer = token.map(|t| {
        let value: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {t}")).expect("header");
        value
    });
    Ok(InterceptedService::new(channel, Bearer(bearer)))
}

struct Callers {
    by_principal: HashMap<&'static str, Conn>,
    token: Conn,
    no_credentials: Conn,
}

impl Callers {
    async fn new(server: &TestServer, pki: &Pki) -> Callers {
        let mut by_principal = HashMap::new();
        for (principal, files) in &pki.clients {
            let conn = connect(server, &pki.ca.ca_file(), Some(files), None)
                .await
                .expect("mTLS connect");
            by_principal.insert(*principal, conn);
        }
        Callers {
            by_principal,
            token: connect(server, &pki.ca.ca_file(), None, Some(TOKEN))
                .await
                .expect("TLS connect"),
            no_credentials: connect(server, &pki.ca.ca_file(), None, None)
                .await
                .expect("TLS connect"),
        }
    }

    fn keys(&self, principal: &str) -> KeyManagementClient<Conn> {
        KeyManagementClient::new(self.by_principal[principal].clone())
    }

    fn crypto(&self, principal: &str) -> CryptoClient<Conn> {
        CryptoClient::new(self.by_principal[principal].clone())
    }

    fn audit(&self, principal: &str) -> AuditClient<Conn> {
        AuditClient::new(self.by_principal[principal].clone())
    }
}

fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn grant(principal: &str, permissions: &[pb::Permission], required: &[(&str, &str)]) -> pb::Grant {
    pb::Grant {
        principal: principal.to_owned(),
        permissions: permissions.iter().map(|p| *p as i32).collect(),
        required_encryption_context: ctx(required),
    }
}

async fn create_key(callers: &Callers, description: &str) -> String {
    callers
        .keys(ADMIN)
        .create_key(pb::CreateKeyRequest {
            description: description.into(),
            ..Default::default()
        })
        .await
        .expect("admin creates keys")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id
}

async fn put_policy(callers: &Callers, key: &str, grants: Vec<pb::Grant>) {
    callers
        .keys(ADMIN)
        .put_key_policy(pb::PutKeyPolicyRequest {
            key_id: key.to_owned(),
            policy: Some(pb::KeyPolicy { grants }),
        })
        .await
        .expect("admin sets policies");
}

async fn encrypt(
    client: &mut CryptoClient<Conn>,
    key: &str,
    context: &[(&str, &str)],
) -> Result<Vec<u8>, Status> {
    client
        .encrypt(pb::EncryptRequest {
            key_id: key.to_owned(),
            plaintext: b"authorized payload".to_vec(),
            encryption_context: ctx(context),
        })
        .await
        .map(|r| r.into_inner().ciphertext_blob)
}

async fn decrypt(
    client: &mut CryptoClient<Conn>,
    blob: &[u8],
    context: &[(&str, &str)],
    named_key: &str,
) -> Result<Vec<u8>, Status> {
    client
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: blob.to_vec(),
            encryption_context: ctx(context),
            key_id: named_key.to_owned(),
        })
        .await
        .map(|r| r.into_inner().plaintext.to_vec())
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, what: &str) {
    match result {
        Ok(v) => panic!("{what}: expected {code:?}, got success {v:?}"),
        Err(status) => assert_eq!(status.code(), code, "{what}: {status:?}"),
    }
}

#[tokio::test]
async fn the_authorization_matrix_holds_over_mtls_and_tokens() {
    let env = TestEnv::new();
    let pki = Pki::new(&env.data.path().join("pki"));
    let server = env.start_with(secure_config(&env, &pki)).await;
    let callers = Callers::new(&server, &pki).await;
    let acme = [("tenant", "acme")];

    // Administrators create keys and set policies.
    let k1 = create_key(&callers, "k1").await;
    let k2 = create_key(&callers, "k2").await;
    use pb::Permission as P;
    put_policy(
        &callers,
        &k1,
        vec![
            grant(ENCRYPTER, &[P::Encrypt], &[]),
            grant(DECRYPTER, &[P::Decrypt], &acme),
            grant(TOKEN_PRINCIPAL, &[P::GenerateDataKey], &[]),
            grant(RE_ENCRYPTER, &[P::ReEncryptFrom], &[]),
        ],
    )
    .await;
    put_policy(
        &callers,
        &k2,
        vec![
            grant(ENCRYPTER, &[P::Encrypt], &[]),
            grant(RE_ENCRYPTER, &[P::ReEncryptTo], &[]),
        ],
    )
    .await;

    // No credentials at all: UNAUTHENTICATED, for every service.
    let mut anonymous = CryptoClient::new(callers.no_credentials.clone());
    assert_code(
        encrypt(&mut anonymous, &k1, &acme).await,
        Code::Unauthenticated,
        "no credentials",
    );
    assert_code(
        KeyManagementClient::new(callers.no_credentials.clone())
            .list_keys(pb::ListKeysRequest::default())
            .await,
        Code::Unauthenticated,
        "no credentials, list keys",
    );
    // A wrong bearer token: UNAUTHENTICATED (not a fallback to anything).
    let wrong_token = connect(&server, &pki.ca.ca_file(), None, Some("kms_wrong"))
        .await
        .expect("connect");
    assert_code(
        encrypt(&mut CryptoClient::new(wrong_token), &k1, &acme).await,
        Code::Unauthenticated,
        "wrong token",
    );
    // A client certificate from another CA never completes the handshake.
    let rogue = pki.rogue_ca.client("intruder", ENCRYPTER);
    match connect(&server, &pki.ca.ca_file(), Some(&rogue), None).await {
        Err(_) => {}
        // With TLS 1.3 the client learns of the refusal on its first call:
        // the server's UnknownCA alert ends the connection.
        Ok(conn) => {
            let status = encrypt(&mut CryptoClient::new(conn), &k1, &acme)
                .await
                .expect_err("certificate from a rogue CA");
            assert!(
                matches!(status.code(), Code::Unknown | Code::Unavailable),
                "{status:?}"
            );
            assert!(format!("{status:?}").contains("UnknownCA"), "{status:?}");
        }
    }
    // Health checks stay open.
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(callers.no_credentials.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health needs no credentials");

    // Encrypt: only the encrypter.
    let mut encrypter = callers.crypto(ENCRYPTER);
    let blob1 = encrypt(&mut encrypter, &k1, &acme)
        .await
        .expect("encrypter encrypts");
    let blob1_other = encrypt(&mut encrypter, &k1, &[("tenant", "other")])
        .await
        .expect("encrypter encrypts for another tenant");
    let blob2 = encrypt(&mut encrypter, &k2, &acme)
        .await
        .expect("encrypter, k2");
    for principal in [DECRYPTER, STRANGER, ADMIN, AUDITOR, RE_ENCRYPTER] {
        assert_code(
            encrypt(&mut callers.crypto(principal), &k1, &acme).await,
            Code::PermissionDenied,
            &format!("encrypt by {principal}"),
        );
    }
    assert_code(
        encrypt(&mut CryptoClient::new(callers.token.clone()), &k1, &acme).await,
        Code::PermissionDenied,
        "encrypt by the token principal",
    );

    // Decrypt: only the decrypter, only for tenant=acme.
    let mut decrypter = callers.crypto(DECRYPTER);
    assert_eq!(
        decrypt(&mut decrypter, &blob1, &acme, "")
            .await
            .expect("decrypter decrypts"),
        b"authorized payload"
    );
    assert_code(
        decrypt(&mut decrypter, &blob1_other, &[("tenant", "other")], "").await,
        Code::PermissionDenied,
        "context condition",
    );
    for principal in [ENCRYPTER, STRANGER, ADMIN, AUDITOR, RE_ENCRYPTER] {
        assert_code(
            decrypt(&mut callers.crypto(principal), &blob1, &acme, "").await,
            Code::PermissionDenied,
            &format!("decrypt by {principal}"),
        );
    }

    // Cross-key confusion: a blob of k2 is authorized against k2 (where the
    // decrypter has no grant), whatever key the caller names.
    assert_code(
        decrypt(&mut decrypter, &blob2, &acme, "").await,
        Code::PermissionDenied,
        "blob of k2",
    );
    assert_code(
        decrypt(&mut decrypter, &blob2, &acme, &k1).await,
        Code::InvalidArgument,
        "blob of k2 presented as k1",
    );

    // GenerateDataKey: only the token principal.
    let mut token_crypto = CryptoClient::new(callers.token.clone());
    let data_key = token_crypto
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: k1.clone(),
            length: Some(pb::generate_data_key_request::Length::KeySpec(
                pb::DataKeySpec::Aes256 as i32,
            )),
            ..Default::default()
        })
        .await
        .expect("token principal generates data keys")
        .into_inner();
    assert_eq!(data_key.plaintext.len(), 32);
    assert_code(
        callers
            .crypto(ENCRYPTER)
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: k1.clone(),
                length: Some(pb::generate_data_key_request::Length::NumberOfBytes(32)),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "data key by the encrypter",
    );

    // ReEncrypt: from k1 to k2 only, needing both grants.
    let mut re = callers.crypto(RE_ENCRYPTER);
    let re_request = |blob: &[u8], destination: &str| pb::ReEncryptRequest {
        ciphertext_blob: blob.to_vec(),
        source_encryption_context: ctx(&acme),
        destination_key_id: destination.to_owned(),
        destination_encryption_context: ctx(&acme),
        ..Default::default()
    };
    let moved = re
        .re_encrypt(re_request(&blob1, &k2))
        .await
        .expect("re-encrypt k1 -> k2")
        .into_inner();
    assert_eq!(moved.key_id, k2);
    assert_code(
        re.re_encrypt(re_request(&blob2, &k1)).await,
        Code::PermissionDenied,
        "re-encrypt k2 -> k1",
    );
    assert_code(
        callers
            .crypto(DECRYPTER)
            .re_encrypt(re_request(&blob1, &k2))
            .await,
        Code::PermissionDenied,
        "re-encrypt without re-encrypt grants",
    );

    // Key management: administrators yes, others no; policies for admins only.
    let mut admin_keys = callers.keys(ADMIN);
    admin_keys
        .describe_key(pb::DescribeKeyRequest { key_id: k1.clone() })
        .await
        .expect("admin describes");
    admin_keys
        .rotate_key(pb::RotateKeyRequest { key_id: k1.clone() })
        .await
        .expect("admin rotates");
    for principal in [ENCRYPTER, STRANGER, AUDITOR] {
        let mut keys = callers.keys(principal);
        assert_code(
            keys.describe_key(pb::DescribeKeyRequest { key_id: k1.clone() })
                .await,
            Code::PermissionDenied,
            &format!("describe by {principal}"),
        );
        assert_code(
            keys.rotate_key(pb::RotateKeyRequest { key_id: k1.clone() })
                .await,
            Code::PermissionDenied,
            &format!("rotate by {principal}"),
        );
        assert_code(
            keys.disable_key(pb::DisableKeyRequest { key_id: k1.clone() })
                .await,
            Code::PermissionDenied,
            &format!("disable by {principal}"),
        );
        assert_code(
            keys.create_key(pb::CreateKeyRequest::default()).await,
            Code::PermissionDenied,
            &format!("create by {principal}"),
        );
        assert_code(
            keys.list_keys(pb::ListKeysRequest::default()).await,
            Code::PermissionDenied,
            &format!("list by {principal}"),
        );
        assert_code(
            keys.put_key_policy(pb::PutKeyPolicyRequest {
                key_id: k1.clone(),
                policy: Some(pb::KeyPolicy {
                    grants: vec![grant(principal, &[P::Decrypt], &[])],
                }),
            })
            .await,
            Code::PermissionDenied,
            &format!("policy change by {principal}"),
        );
    }
    // Blobs made before the rotation still decrypt for the decrypter.
    decrypt(&mut decrypter, &blob1, &acme, &k1)
        .await
        .expect("old version decrypts after rotation");

    // The audit log: auditors and admins read it, others do not.
    assert_code(
        callers
            .audit(ENCRYPTER)
            .list_audit_events(pb::ListAuditEventsRequest::default())
            .await,
        Code::PermissionDenied,
        "audit read by a service",
    );
    // Watching the log: the same rule as listing it.
    assert_code(
        callers
            .audit(ENCRYPTER)
            .watch_audit_events(pb::WatchAuditEventsRequest { from_sequence: 1 })
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        "audit watched by a service",
    );
    let mut watched = callers
        .audit(AUDITOR)
        .watch_audit_events(pb::WatchAuditEventsRequest { from_sequence: 1 })
        .await
        .expect("auditor watches")
        .into_inner();
    let first = watched
        .message()
        .await
        .expect("stream")
        .and_then(|m| m.event)
        .expect("an event");
    assert_eq!(first.sequence, 1);
    drop(watched);
    let mut auditor = callers.audit(AUDITOR);
    let verified = auditor
        .verify_audit_log(pb::VerifyAuditLogRequest::default())
        .await
        .expect("auditor verifies")
        .into_inner();
    assert!(verified.valid, "{verified:?}");

    // Every denial is an audit record naming the principal.
    let mut denied_principals = std::collections::BTreeSet::new();
    let mut page_token = String::new();
    loop {
        let page = auditor
            .list_audit_events(pb::ListAuditEventsRequest {
                page_token: page_token.clone(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("auditor lists")
            .into_inner();
        for event in &page.events {
            if event.result_code == Code::PermissionDenied as i32 {
                denied_principals.insert(event.principal.clone());
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    for principal in [
        ENCRYPTER,
        DECRYPTER,
        STRANGER,
        ADMIN,
        AUDITOR,
        RE_ENCRYPTER,
        TOKEN_PRINCIPAL,
    ] {
        assert!(
            denied_principals.contains(principal),
            "no denial audited for {principal}: {denied_principals:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn per_principal_rate_limits_answer_resource_exhausted() {
    let env = TestEnv::new();
    let mut config = env.config();
    config.limits.per_principal = kms::auth::admission::PrincipalLimits {
        requests_per_second: Some(1.0),
        burst: 5.0,
        max_in_flight: None,
    };
    let server = env.start_with(config).await;
    let key = super::create_key(&server, "rate limited").await;
    let mut crypto = server.crypto();
    let mut outcomes = Vec::new();
    for _ in 0..20 {
        outcomes.push(
            crypto
                .generate_random(pb::GenerateRandomRequest { number_of_bytes: 8 })
                .await
                .map(|_| ())
                .map_err(|s| s.code()),
        );
    }
    let exhausted = outcomes
        .iter()
        .filter(|o| **o == Err(Code::ResourceExhausted))
        .count();
    // The burst (minus the CreateKey above) passes, the rest is refused at once.
    assert!(exhausted >= 14, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| o.is_ok() || *o == Err(Code::ResourceExhausted))
    );
    let _ = key;
    server.stop().await;
}

#[tokio::test]
async fn the_connection_cap_makes_further_clients_wait_not_crash_the_server() {
    let env = TestEnv::new();
    let mut config = env.config();
    config.server.max_connections = 1;
    // The test server's own channel holds the one slot.
    let mut server = env.start_with(config).await;
    server
        .crypto()
        .generate_random(pb::GenerateRandomRequest { number_of_bytes: 8 })
        .await
        .expect("the first connection is served");

    // A second client is accepted by the kernel but not served while the
    // slot is taken: its call runs into its deadline.
    let second = Channel::from_shared(server.endpoint.clone())
        .expect("endpoint")
        .timeout(std::time::Duration::from_millis(500))
        .connect_lazy();
    let status = CryptoClient::new(second.clone())
        .generate_random(pb::GenerateRandomRequest { number_of_bytes: 8 })
        .await
        .expect_err("no free connection slot");
    assert!(
        matches!(
            status.code(),
            Code::Cancelled | Code::DeadlineExceeded | Code::Unavailable
        ),
        "{status:?}"
    );

    // Once the first connection closes, a new client gets the slot.
    drop(second);
    let first = std::mem::replace(
        &mut server.channel,
        Channel::from_static("http://127.0.0.1:9").connect_lazy(),
    );
    drop(first);
    let third = Channel::from_shared(server.endpoint.clone())
        .expect("endpoint")
        .timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .expect("connect after the slot is free");
    CryptoClient::new(third)
        .generate_random(pb::GenerateRandomRequest { number_of_bytes: 8 })
        .await
        .expect("served once a slot is free");
    server.stop().await;
}
